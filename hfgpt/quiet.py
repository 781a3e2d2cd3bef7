"""The messages of hfgpt's dependencies that hfgpt keeps from its users, and why.

Each one is a message a user cannot act on: it comes from code between two dependencies, or states something hfgpt
already handles. Everything else those libraries print still shows. `install()` runs when hfgpt is imported, before
anything imports bitsandbytes; `expected_new_head()` is used where hfgpt loads a pretrained model under a new head.
"""

import contextlib
import logging
import re
import warnings

# bitsandbytes (imported by Trainer through PEFT, whether or not any weight is 4-bit) tries, offline, to fetch its
# optional faster CPU 4-bit kernel from the Hub and reports it as a failure
_BITSANDBYTES_OFFLINE = ("Failed to load CPU gemm_4bit_forward from kernels-community",
                         "Skipping publisher trust check for 'kernels-community/quantization-")
# Trainer's checkpoint rotation: checkpoints written within a second of each other (a short run) are ordered by step
# instead of time, which is what hfgpt wants anyway
_CHECKPOINT_MTIME = "mtime may not be reliable on this filesystem"
# TRL 1.16 calls the model methods transformers 5.25 renamed (gradient_checkpointing_* -> activation_checkpointing_*):
# the call is in TRL's code, not the user's. hfgpt's own configs use the new names, so the TrainingArguments field's
# deprecation warning still shows when a user passes --gradient_checkpointing (that one they can act on).
_RENAMED_CHECKPOINTING_METHODS = r"`(gradient_checkpointing_enable|gradient_checkpointing_disable|" \
                                 r"is_gradient_checkpointing)` is deprecated"
# transformers prints its load report in bold with raw ANSI codes, also into log files
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# transformers' save and load progress bars run once per shard / per tensor: for a model hfgpt trains on a CPU they
# finish in well under a second, and in a log file they are only noise. They show if they last longer than this.
_QUICK_BAR_DESCRIPTIONS = ("Writing model shards", "Loading weights")
QUICK_BAR_DELAY_SECONDS = 2.0


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class _PlainLoadReport(logging.Filter):
    """Takes the ANSI codes out of transformers' load report (it writes them whether or not the output is a
    terminal)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            record.msg, record.args = _ANSI_ESCAPE.sub("", record.getMessage()), None
        return True


class _NewHeadReport(logging.Filter):
    """Holds back a load report while a pretrained model is loaded under a head it does not have yet."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True


def _delay_quick_bars(factory, args, kwargs):
    if kwargs.get("desc") in _QUICK_BAR_DESCRIPTIONS:
        kwargs = {"delay": QUICK_BAR_DELAY_SECONDS, **kwargs}
    return factory(*args, **kwargs)


def install() -> None:
    """Puts the filters above in place (idempotent)."""
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        _add_once(logging.getLogger(name), _DropMessages(_BITSANDBYTES_OFFLINE))
    from transformers.utils import logging as transformers_logging  # after the filters: it may import bitsandbytes
    _add_once(logging.getLogger("transformers.trainer_utils"), _DropMessages((_CHECKPOINT_MTIME,)))
    _add_once(logging.getLogger("transformers.modeling_utils"), _PlainLoadReport())
    warnings.filterwarnings("ignore", message=_RENAMED_CHECKPOINTING_METHODS, category=FutureWarning)
    if transformers_logging._tqdm_hook is None:  # leave a hook the user installed alone
        transformers_logging.set_tqdm_hook(_delay_quick_bars)


def _add_once(logger: logging.Logger, new_filter: logging.Filter) -> None:
    if not any(type(existing) is type(new_filter) for existing in logger.filters):
        logger.addFilter(new_filter)


@contextlib.contextmanager
def expected_new_head(head_prefixes: tuple[str, ...]):
    """While a causal LM is loaded as a classifier (or another head), its new head's weights are missing from the
    checkpoint by design and its LM head is left over: transformers reports both in a table as a warning. Within this
    block that report is replaced by one line when it lists nothing else; any other finding shows the report as is."""
    logger = logging.getLogger("transformers.modeling_utils")
    holder = _NewHeadReport()
    logger.addFilter(holder)
    try:
        yield
    finally:
        logger.removeFilter(holder)
    for record in holder.held:
        report = _ANSI_ESCAPE.sub("", record.getMessage())
        rows = re.findall(r"^(.+?)\s*\|\s*([A-Z]+)\s*\|", report, flags=re.MULTILINE)
        new_keys = [key for key, status in rows if status == "MISSING" and key.startswith(head_prefixes)]
        expected = len(new_keys) + sum(status == "UNEXPECTED" and key.startswith("lm_head") for key, status in rows)
        if new_keys and expected == len(rows):
            print(f"New head: {', '.join(new_keys)} initialised at random (the pretrained model has none); this run "
                  f"trains it.")
        else:
            logger.warning(report)

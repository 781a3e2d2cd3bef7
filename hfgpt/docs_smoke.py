"""HFGPT_DOCS_SMOKE: how the tests run the documentation's commands as written, in seconds instead of hours.

Every ```bash and ```python block of README.md and docs/*.md is executed by tests/test_docs.py. The commands there are
the real ones (`hfgpt pretrain` trains for minutes, `--max_steps 20000` means it); the test scales them down by setting
this environment variable, never by editing their text. Every `hfgpt` command passes its parsed arguments through
`scale_down` right after parsing them, and nothing else in hfgpt reads the variable:

- `HFGPT_DOCS_SMOKE=1`: the command runs, scaled down. Training stops after `SMOKE_LIMITS["max_steps"]` optimizer
  steps; a `--preset` becomes the tiny preset of the same architecture with the preset's context length kept (so
  `--block_size` and exports mean what they say); the built-in corpus and the tokenizer's training text are cut; held-out
  generations, samples, ROUGE examples and chat answers are a few short ones. Everything else (data files, flags,
  outputs) is as written, so a command that works scaled down works at full size.
- `HFGPT_DOCS_SMOKE=parse`: the command parses and checks its arguments, says so, and exits with status 0 before
  reading data or loading a model (`ArgumentsParsed`). The test uses it for blocks marked `<!-- not-run: reason -->`
  (they need a GPU, the Hub or several machines), so that their commands still have to parse.

Unset (as for every user), `scale_down` returns its arguments untouched.
"""

import os
import sys

ENV = "HFGPT_DOCS_SMOKE"

# Caps for HFGPT_DOCS_SMOKE=1, by argument name: whichever of these a command has is lowered to at most this value.
SMOKE_LIMITS = {
    "max_steps": 2,  # optimizer steps of any training run (TrainingArguments; -1, "use the epochs", counts as more)
    "default_corpus_max_chars": 100_000,  # `hfgpt pretrain`'s built-in corpus (the standard library's docstrings)
    "tokenizer_max_chars": 100_000,  # the text a new tokenizer is trained on
    "num_samples": 1,  # sample generations printed after pretraining
    "sample_max_new_tokens": 8,
    "max_eval_prompts": 2,  # held-out prompts answered after SFT / DPO
    "max_new_tokens": 8,  # SFT / DPO answers, `hfgpt eval rouge`, `hfgpt chat`
    "max_examples": 4,  # `hfgpt eval rouge` rows
}
# A preset becomes its tiny sibling (the same switches, 2 layers of width 64); its context length is kept.
TINY_PRESET = {"modern": "modern-tiny"}


class ArgumentsParsed(SystemExit):
    """HFGPT_DOCS_SMOKE=parse: the arguments parsed; the command stops here, successfully."""

    def __init__(self, prog: str):
        super().__init__(0)
        self.prog = prog


def mode() -> str | None:
    """None (a normal run), "run" (HFGPT_DOCS_SMOKE=1) or "parse"."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "0", "false"):
        return None
    if value == "parse":
        return "parse"
    if value in ("1", "true", "run"):
        return "run"
    raise ValueError(f"{ENV}={value!r}: use 1 (run the command scaled down) or parse (only parse its arguments).")


def scale_down(prog: str, *parsed):
    """Apply HFGPT_DOCS_SMOKE to a command's parsed arguments (dataclasses or argparse namespaces), in place.

    Returns `parsed` (a single object when one was given), so a parser can end with `return scale_down(...)`.
    """
    smoke = mode()
    if smoke == "parse":
        print(f"{ENV}=parse: the arguments of {prog} parse; stopping before any work.", file=sys.stderr)
        raise ArgumentsParsed(prog)
    if smoke == "run":
        for arguments in parsed:
            _cap(arguments)
        print(f"{ENV}=1: {prog} runs scaled down (hfgpt/docs_smoke.py).", file=sys.stderr)
    return parsed[0] if len(parsed) == 1 else parsed


def _cap(arguments) -> None:
    for name, limit in SMOKE_LIMITS.items():
        if not hasattr(arguments, name):
            continue
        value = getattr(arguments, name)
        # None ("all of it") and max_steps=-1 ("train the epochs") are more than the cap
        if value is None or (not isinstance(value, bool) and (value < 0 or value > limit)):
            setattr(arguments, name, limit)
    preset = getattr(arguments, "preset", None)
    if isinstance(preset, str) and hasattr(arguments, "config_overrides"):
        _tiny_preset(arguments, preset)


def _tiny_preset(arguments, preset: str) -> None:
    from .configuration_hfgpt import HFGPTConfig

    tiny = TINY_PRESET.get(preset, "modern-tiny" if preset.startswith("modern") else "tiny")
    context = HFGPTConfig.from_preset(preset).max_position_embeddings
    arguments.preset = tiny
    # the command's own overrides come after, so they still win
    overrides = [f"max_position_embeddings={context}", arguments.config_overrides]
    arguments.config_overrides = ",".join(text for text in overrides if text)

"""What every hfgpt training script shares, whatever the task (pretraining, classification, SFT, DPO).

- `MatrixWeightDecayMixin`: put it before any `Trainer` subclass (`class T(MatrixWeightDecayMixin, SFTTrainer)`) to
  decay only weight matrices; `decay_parameter_names` is the rule itself.
- `PerplexityMixin`: adds `eval_perplexity = exp(eval_loss)` to every evaluation (causal LM tasks).
- `LogHistoryCallback`: keeps log_history.json / .csv and loss_curve.png in the output directory up to date.
- `StopOnNonFiniteWeights`: ends a diverged run (NaN/inf weights) with an error that says what to do.
  `training_callbacks` gives both, the callbacks every hfgpt trainer starts with.
- Checkpoints: `resolve_resume_checkpoint` finds the newest *complete* checkpoint (a crash while saving leaves an
  incomplete one, which is skipped); `check_output_dir` refuses to mix a run into a directory holding another model.
- The end of a run: `save_final_model` (no pickles in the model directory), `write_training_summary`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedConfig, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import files

TRAINER_STATE_NAME = "trainer_state.json"  # the last file Trainer writes into a checkpoint
TRAINING_ARGS_NAME = "training_args.bin"  # Trainer's pickle of the arguments; replaced by training_summary.json

# ---------------------------------------------------------------------------------------------------------------------
# Optimizer: weight decay on matrices only


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that get weight decay: matrices (>= 2-D weights, e.g. every `nn.Linear` weight), but
    never embeddings (token or position tables, nor an output layer tied to them), norms or biases.

    Decay pulls weights towards 0; for a norm's gain that means towards "switch the feature off", and for an embedding
    it penalises rare tokens for being rare, so both are left alone (as in GPT-2/nanoGPT, Llama and most LLM recipes).
    Names are those of `model.named_parameters()`, wrapped models (DDP, FSDP) included.
    """
    embedding_parameters = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            continue
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in embedding_parameters:
                continue
            # nn.Linear weights are matrices even when a sharding wrapper has flattened them to 1-D
            if parameter.ndim >= 2 or (isinstance(module, nn.Linear) and name == "weight"):
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


class MatrixWeightDecayMixin:
    """Weight decay on weight matrices only (see `decay_parameter_names`); every other Trainer behaviour unchanged,
    including `--optim`, FSDP and DeepSpeed, which build their optimizers from these groups."""

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return decay_parameter_names(model)


class PerplexityMixin:
    """Reports `<prefix>_perplexity = exp(<prefix>_loss)` with every evaluation (logged, so it reaches TensorBoard,
    the log history and the loss curve). The loss is the mean token cross-entropy in nats."""

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = perplexity(loss)
        return output


def perplexity(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")  # exp overflows a float above ~709


# ---------------------------------------------------------------------------------------------------------------------
# Logs: JSON, CSV and the loss curve


def write_log_history(output_dir: str | os.PathLike, log_history: list[dict]) -> None:
    """`Trainer.state.log_history` as log_history.json and log_history.csv (one row per log, union of keys)."""
    output_dir = Path(output_dir)
    files.write_json(output_dir / files.LOG_HISTORY_JSON, log_history)
    columns = list(dict.fromkeys(key for entry in log_history for key in entry))
    tmp = output_dir / (files.LOG_HISTORY_CSV + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(log_history)
    os.replace(tmp, output_dir / files.LOG_HISTORY_CSV)


def plot_loss_curve(log_history: list[dict], path: str | os.PathLike, title: str | None = None,
                    loss_per: str = "token") -> Path | None:
    """Training loss and validation loss against the optimizer step; None when nothing was logged yet. `loss_per`:
    what the loss is a mean over ("token" for language models, "example" for classifiers)."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    evals = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry and "step" in entry]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed; also safe in a training process without a GUI
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        axes.plot(*zip(*train), label="training loss", linewidth=1.2)
    if evals:
        axes.plot(*zip(*evals), "o-", label="validation loss", linewidth=1.5, markersize=4)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(f"cross-entropy (nats per {loss_per})")
    axes.set_title(title or "Loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)  # keep the extension: matplotlib picks the format from it
    figure.savefig(tmp)
    plt.close(figure)
    os.replace(tmp, path)
    return path


class LogHistoryCallback(TrainerCallback):
    """Writes log_history.json/.csv after every log and loss_curve.png after every evaluation and at the end, into
    `args.output_dir` (main process only), so an interrupted run still leaves its curves behind."""

    def __init__(self, title: str | None = None, loss_per: str = "token"):
        self.title, self.loss_per = title, loss_per

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            write_log_history(args.output_dir, state.log_history)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero:
            plot_loss_curve(state.log_history, Path(args.output_dir) / files.LOSS_CURVE, self.title, self.loss_per)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_log_history(args.output_dir, state.log_history)
            plot_loss_curve(state.log_history, Path(args.output_dir) / files.LOSS_CURVE, self.title, self.loss_per)


class NonFiniteTrainingError(RuntimeError):
    """Training diverged: the model's weights hold NaN or inf."""


class StopOnNonFiniteWeights(TrainerCallback):
    """Stops a run whose weights have gone NaN or inf, with an error saying what to do, instead of training on for
    hours and saving a model that outputs nothing but NaN. Trainer's `logging_nan_inf_filter` keeps non-finite
    losses out of the logged loss, so the logged gradient norm is watched too; when a watched value is not finite,
    or a training log has no gradient norm to go by, the weights themselves decide (an fp16 step the loss scaler
    skipped has an inf gradient norm but finite weights, and goes on)."""

    watched = ("loss", "grad_norm", "eval_loss")

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        logs = logs or {}
        values = [logs[key] for key in self.watched if isinstance(logs.get(key), (int, float))]
        no_gradient_norm = "loss" in logs and "grad_norm" not in logs
        if model is None or (all(map(math.isfinite, values)) and not no_gradient_norm):
            return
        if all(torch.isfinite(parameter).all() for parameter in model.parameters() if parameter.is_floating_point()):
            return
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else None
        checkpoint = last_complete_checkpoint(args.output_dir)
        raise NonFiniteTrainingError(
            f"Training diverged by step {state.global_step}: the model's weights hold NaN or inf (last logged loss "
            f"{logs.get('loss')}, gradient norm {logs.get('grad_norm')}, learning rate {logs.get('learning_rate')})."
            f" The run is stopped and this model is not saved. Try a lower --learning_rate, more --warmup_steps, "
            f"--max_grad_norm 1.0" + (f", or fp32 instead of {precision}" if precision else "") + ". "
            + (f"The newest checkpoint, {checkpoint}, was saved before this log; resume from it only if its step is "
               f"before the loss went wrong ({Path(args.output_dir) / files.LOG_HISTORY_CSV})."
               if checkpoint else "No checkpoint was saved before it.")
        )


def training_callbacks(title: str | None = None, loss_per: str = "token") -> list[TrainerCallback]:
    """The callbacks every hfgpt trainer starts with: curves kept on disk, and a diverged run stopped."""
    return [LogHistoryCallback(title, loss_per), StopOnNonFiniteWeights()]


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and the output directory

_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-<step>` directories, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in output_dir.iterdir()
             if path.is_dir() and (match := _CHECKPOINT_RE.match(path.name))]
    return [path for _, path in sorted(found)]


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Trainer writes trainer_state.json last; a checkpoint without a readable one was interrupted while saving."""
    try:
        state = json.loads((Path(path) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    complete = [path for path in checkpoint_dirs(output_dir) if is_complete_checkpoint(path)]
    return complete[-1] if complete else None


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """`--resume_from_checkpoint` -> the checkpoint directory to resume from, or None to start from scratch.

    "true"/True: the newest complete checkpoint in `output_dir` (Trainer's own `get_last_checkpoint` would take the
    newest directory even if a crash interrupted its writing). A path must be a complete checkpoint.
    """
    if resume_from_checkpoint in (None, False, "", "false", "False"):
        return None
    if resume_from_checkpoint in (True, "true", "True"):
        found = last_complete_checkpoint(output_dir)
        if found is None:
            incomplete = [path.name for path in checkpoint_dirs(output_dir)]
            raise FileNotFoundError(
                f"--resume_from_checkpoint: no complete checkpoint in {output_dir}"
                + (f" (incomplete: {', '.join(incomplete)}; they lack a readable {TRAINER_STATE_NAME})" if incomplete
                   else "") + ". Start without --resume_from_checkpoint, or point it at a checkpoint directory."
            )
        return str(found)
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: no such directory. Pass a checkpoint-<step> "
                                "directory, or `true` for the newest one in --output_dir.")
    if not is_complete_checkpoint(path):
        newest = last_complete_checkpoint(path.parent)
        hint = f" The newest complete one next to it is {newest}." if newest else ""
        raise ValueError(f"--resume_from_checkpoint {path} is not a complete checkpoint (no readable "
                         f"{TRAINER_STATE_NAME}; was the run killed while saving it?).{hint}")
    return str(path)


class ResumeMixin:
    """Put before a `Trainer` class. On resume, says which checkpoint the run continues from; and stays quiet about
    the tied output layer, which a checkpoint stores once (as the input embedding) and which is tied again on load,
    where Trainer would warn `missing keys ... lm_head.weight`."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_world_process_zero():
            state = files.read_json(Path(resume_from_checkpoint) / TRAINER_STATE_NAME, default={}) or {}
            print(f"Resuming from {resume_from_checkpoint} (step {state.get('global_step', '?')}).")
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _issue_warnings_after_load(self, load_result):
        tied = tied_parameter_names(self.model)
        load_result.missing_keys[:] = [key for key in load_result.missing_keys if key not in tied]
        return super()._issue_warnings_after_load(load_result)


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Full names of the parameters tied to another one (transformers v5: `_tied_weights_keys` {target: source} on the
    module that owns them), wrapped models (PEFT, DDP) included; only where the config really ties them."""
    names = set()
    for prefix, module in model.named_modules():
        keys = getattr(module, "_tied_weights_keys", None)
        config = getattr(module, "config", None)
        if isinstance(keys, dict) and getattr(config, "tie_word_embeddings", False):
            names |= {f"{prefix}.{key}" if prefix else key for key in keys}
    return names


def resume_command(prog: str, argv: Sequence[str]) -> str:
    """The command that continues an interrupted run: the same arguments plus `--resume_from_checkpoint true`, less
    `--overwrite_output_dir` (which would start over)."""
    kept, args, index = [], list(argv), 0
    while index < len(args):
        argument = args[index]
        index += 1
        if argument.split("=", 1)[0] in ("--overwrite_output_dir", "--resume_from_checkpoint"):
            if "=" not in argument and index < len(args) and not args[index].startswith("--"):
                index += 1  # its value
            continue
        kept.append(argument)
    return shlex.join([*prog.split(), *kept, "--resume_from_checkpoint", "true"])


def report_interrupted(prog: str, output_dir: str | os.PathLike, argv: Sequence[str] | None) -> int:
    """What a Ctrl-C during training prints instead of a traceback: where the last complete checkpoint is and the
    exact command that resumes from it. Returns 130, the shell's status for a run ended by SIGINT."""
    argv = list(sys.argv[1:] if argv is None else argv)
    checkpoint = last_complete_checkpoint(output_dir)
    if checkpoint is None:
        message = (f"{prog}: interrupted before the first checkpoint was saved (--save_steps), so there is nothing to "
                   "resume: run the same command again to start over.")
    else:
        step = (files.read_json(checkpoint / TRAINER_STATE_NAME, default={}) or {}).get("global_step")
        if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
            how = f"set resume_from_checkpoint: true in {argv[0]} and run {prog} {argv[0]} again"
        else:
            how = f"run\n  {resume_command(prog, argv)}"
        message = (f"{prog}: interrupted. The last complete checkpoint is {checkpoint} (step {step}); to continue "
                   f"from it, {how}")
    print("\n" + message, file=sys.stderr)
    return 130


# Config keys that do not change what the weights mean: metadata and training-time knobs.
_CONFIG_KEYS_NOT_COMPARED = {
    "transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "auto_map", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "initializer_range", "embedding_dropout",
    "attention_dropout", "residual_dropout", "classifier_dropout", "chunk_size_feed_forward", "_attn_implementation",
}


# Config keys a model fills in when it first trains (a classifier's problem_type, from the labels' dtype): a new run's
# config without them is the same model.
_CONFIG_KEYS_SET_BY_TRAINING = {"problem_type"}


def config_differences(saved: dict, config: PreTrainedConfig) -> dict[str, tuple]:
    """{key: (saved value, new value)} for the keys that make `saved` (a config.json) a different model."""
    new = json.loads(config.to_json_string(use_diff=False))
    keys = (saved.keys() | new.keys()) - _CONFIG_KEYS_NOT_COMPARED
    return {key: (saved.get(key), new.get(key)) for key in sorted(keys)
            if key in saved and key in new and saved[key] != new[key]
            and not (key in _CONFIG_KEYS_SET_BY_TRAINING and new[key] is None)}


# What a tokenizer decides: unknown before it is loaded or trained, so `check_output_dir(..., before_tokenizer=True)`
# leaves them out of the comparison
_TOKENIZER_CONFIG_KEYS = {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"}


def check_output_dir(output_dir: str | os.PathLike, config: PreTrainedConfig, resume_checkpoint: str | None,
                     overwrite_output_dir: bool = False, before_tokenizer: bool = False) -> None:
    """Refuse to write a run into a directory that holds something else.

    - A model whose config differs from `config` (in the directory or the checkpoint being resumed): error naming the
      differences, unless `overwrite_output_dir`.
    - A finished model or checkpoints of an earlier run, when not resuming: error unless `overwrite_output_dir`
      (then the old checkpoints are deleted, so they cannot be mistaken for this run's).

    `before_tokenizer=True`: the cheap check scripts make before any data work, with the config as far as it is known
    (the tokenizer's sizes and ids left out of the comparison); it deletes nothing. Call it again with the full config.
    """
    output_dir = Path(output_dir)
    sources = [Path(resume_checkpoint)] if resume_checkpoint else []
    sources.append(output_dir)
    for source in sources:
        saved = files.read_json(source / "config.json")
        if saved is None:
            continue
        differences = config_differences(saved, config)
        if before_tokenizer:
            differences = {key: value for key, value in differences.items() if key not in _TOKENIZER_CONFIG_KEYS}
        if differences and not overwrite_output_dir:
            listed = ", ".join(f"{key}: {old!r} there, {new!r} now" for key, (old, new) in list(differences.items())[:8])
            raise ValueError(
                f"{source} holds a different model ({listed}). Use another --output_dir, or pass "
                f"--overwrite_output_dir to replace it" + (" (resuming needs the same model configuration)."
                                                         if resume_checkpoint else ".")
            )
    if resume_checkpoint:
        return
    earlier = checkpoint_dirs(output_dir)
    has_model = (output_dir / "config.json").is_file()
    if (earlier or has_model) and not overwrite_output_dir:
        what = ", ".join(filter(None, ["a trained model" if has_model else "",
                                       f"{len(earlier)} checkpoint(s)" if earlier else ""]))
        raise ValueError(
            f"{output_dir} already holds {what} from an earlier run. Pass --resume_from_checkpoint true to continue "
            "that run, --overwrite_output_dir to start again in it, or choose another --output_dir."
        )
    if overwrite_output_dir and not before_tokenizer:
        for path in earlier:
            shutil.rmtree(path, ignore_errors=True)
        # the old model's scores must not be shown as the new model's
        (output_dir / files.EVAL_RESULTS).unlink(missing_ok=True)


def has_accelerator() -> bool:
    return torch.cuda.is_available() or _has_xpu() or torch.backends.mps.is_available()


def launched_processes() -> int:
    """How many processes `torchrun` / `accelerate launch` started (1 for a plain `python` run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def use_cpu_for_multiple_cpu_processes(args) -> None:
    """Call in a TrainingArguments subclass's `__post_init__`, before devices are set up: several processes on a
    machine without GPUs need `use_cpu=True`, or each process trains alone while thinking it is one of several."""
    if launched_processes() > 1 and not has_accelerator():
        args.use_cpu = True


def check_distributed_setup(args) -> None:
    """Several processes were launched but Trainer does not see a distributed run: stop before training N copies."""
    from transformers.training_args import ParallelMode

    if launched_processes() > 1 and args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise ValueError(
            f"{launched_processes()} processes were launched, but Trainer does not see a distributed run "
            f"({args.parallel_mode}). On a machine without GPUs pass --use_cpu true (the processes then talk over "
            "gloo); with GPUs, check that every process sees one."
        )


def end_distributed() -> None:
    """After a script's last save in a multi-process run: wait until every process is done, tear the process group
    down, and end this process at once (exit code 0) instead of returning. A single process returns untouched.

    Why the hard exit: gloo's worker threads drop their last collectives (the final barrier, which holds FSDP's last
    all-gathers) a moment after the caller has seen them complete, and dropping a tensor that Python has seen takes
    the GIL. If the interpreter is already finalizing by then, the thread is ended inside a C++ destructor and the
    process aborts ("terminate called without an active exception", SIGABRT; the launcher then fails the whole run).
    `destroy_process_group` cannot prevent it: FSDP's device mesh still holds the group, so its threads live on.
    Reproduced in 2 of 20 two-process FSDP2 runs and seen in CI; the core dump shows the abort in
    `AsyncBarrierWork::~AsyncBarrierWork` on a gloo thread while the main thread is in `Py_FinalizeEx`. Everything is
    saved by then; streams and logging are flushed before leaving. The barrier comes first because a process that
    destroys the group while another still works (rank 0 writes the summary, the card, generations) hangs the run.
    Call it on success only: after an error the other processes may never reach the barrier, and the launcher stops
    them anyway.
    """
    import logging

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def warn_if_sharding_is_ignored(trainer) -> None:
    """Say so when an accelerate config asks for sharding that is not active: DeepSpeed on CPU processes (it needs
    GPUs), or FSDP1 there (hfgpt runs FSDP2 on CPU processes, see `hfgpt.training.sharding`); accelerate falls back
    to plain data parallel without a word."""
    requested = [name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                 if os.environ.get(variable, "false").lower() in ("1", "true")]
    enabled = {"FSDP": trainer.is_fsdp_enabled, "DeepSpeed": trainer.is_deepspeed_enabled}
    needs = {"FSDP": "on CPU processes only FSDP2 runs: set fsdp_version: 2", "DeepSpeed": "DeepSpeed needs GPUs"}
    for name in requested:
        if not enabled[name] and trainer.args.process_index == 0:
            print(f"Warning: the accelerate config asks for {name}, but {name} is not active on this machine "
                  f"({trainer.args.distributed_state.distributed_type}; {needs[name]}): training runs as plain "
                  "data parallel.", file=sys.stderr)


def check_mixed_precision(args) -> None:
    """fp16 needs a GPU (CPU autocast to fp16 is slow and unscaled); bf16 is checked by TrainingArguments itself."""
    if getattr(args, "fp16", False) and not (torch.cuda.is_available() or _has_xpu()):
        raise ValueError("--fp16 needs a CUDA (or XPU) GPU and none is available. Drop --fp16 (the CPU trains in "
                         "fp32), or use --bf16 on hardware that supports it.")


def _has_xpu() -> bool:
    return bool(getattr(torch, "xpu", None) and torch.xpu.is_available())


# ---------------------------------------------------------------------------------------------------------------------
# The end of a run


def save_final_model(trainer, output_dir: str | os.PathLike) -> None:
    """Save the complete model (weights as safetensors, config, modelling code, tokenizer, generation config) with
    `trainer.save_model`, which also gathers sharded FSDP/DeepSpeed weights, then drop Trainer's pickled
    training_args.bin: the model directory holds no pickle (the arguments go to training_summary.json)."""
    fsdp_plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if trainer.is_fsdp_enabled and fsdp_plugin is not None:
        fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")  # one loadable file, not per-rank shards
    trainer.save_model(output_dir)
    if trainer.args.should_save:
        (Path(output_dir) / TRAINING_ARGS_NAME).unlink(missing_ok=True)


def training_arguments_summary(args) -> dict:
    """The TrainingArguments worth recording (JSON-safe), without tokens or paths that say nothing about the run."""
    keep = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
            "adam_epsilon", "max_grad_norm", "per_device_train_batch_size", "gradient_accumulation_steps",
            "num_train_epochs", "max_steps", "optim", "seed", "bf16", "fp16", "activation_checkpointing")
    values = args.to_dict()
    summary = {key: values[key] for key in keep if key in values}
    summary["world_size"] = args.world_size
    if args.world_size > 1:  # how the processes split the work: MULTI_CPU / MULTI_GPU (DDP), FSDP, DEEPSPEED
        summary["distributed_type"] = str(args.distributed_state.distributed_type.value)
    summary["global_batch_size"] = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return summary


def training_data_record(train_files) -> dict:
    """training_summary.json's fingerprints of the training files (name, size, sha256; no paths), by which
    `hfgpt eval` recognises a file the model was trained on. Empty for Hub datasets and in-memory rows."""
    from ..data.sources import expand_data_files, split_file_list

    paths = expand_data_files(split_file_list(train_files)) if train_files else []
    if not paths:
        return {}
    return {files.TRAINING_DATA_FILES: [files.fingerprint(path) for path in paths]}


def write_training_summary(output_dir: str | os.PathLike, summary: dict) -> Path:
    """training_summary.json (read by the model card)."""
    return files.write_json(Path(output_dir) / files.TRAINING_SUMMARY, summary)


__all__ = [
    "LogHistoryCallback",
    "MatrixWeightDecayMixin",
    "PerplexityMixin",
    "ResumeMixin",
    "check_distributed_setup",
    "check_mixed_precision",
    "check_output_dir",
    "checkpoint_dirs",
    "config_differences",
    "decay_parameter_names",
    "end_distributed",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
    "perplexity",
    "plot_loss_curve",
    "report_interrupted",
    "resume_command",
    "resolve_resume_checkpoint",
    "save_final_model",
    "training_arguments_summary",
    "use_cpu_for_multiple_cpu_processes",
    "warn_if_sharding_is_ignored",
    "training_data_record",
    "write_log_history",
    "write_training_summary",
]

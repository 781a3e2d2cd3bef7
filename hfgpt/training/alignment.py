"""Instruction tuning (SFT) and preference tuning (DPO) with TRL, for hfgpt models and any other causal LM.

    from hfgpt.training.alignment import HFGPTDPOConfig, HFGPTSFTConfig, run_dpo, run_sft

    sft = run_sft("out/pretrained", instruction_rows, HFGPTSFTConfig("out/sft"), eval_dataset=held_out)
    dpo = run_dpo("out/sft", preference_rows, HFGPTDPOConfig("out/dpo", beta=0.1), eval_dataset=held_out_pairs)
    dpo.metrics["preference"]["reward_accuracy"], dpo.metrics["rouge"]["rougeL"]

(`HFGPTSFTConfig` / `HFGPTDPOConfig` are TRL's configs with hfgpt's defaults: assistant-only loss, and bf16 only on
hardware that has it; TRL's own `SFTConfig` / `DPOConfig` work too.)

Both take the model as a directory, a Hub id or an in-memory model, and rows in any shape `hfgpt.data.chat` reads
(Alpaca `instruction`/`input`/`output`, chat `messages`, preference rows with `chosen`/`rejected`). Formatting goes
through `hfgpt.data.chat`, the same path evaluation uses.

- SFT trains on the assistant's tokens only: TRL's `assistant_only_loss` reads the `{% generation %}` markers of
  the chat template (hfgpt's template puts the answer and its end-of-turn EOS inside them, so the model learns to
  stop). `--packing` packs conversations into `max_length` blocks (position ids restart per conversation).
- DPO's reference model is a frozen copy of the starting model, or `ref_model` / `--ref_model_name_or_path`; with
  LoRA there is no copy at all: TRL computes the reference with the adapters disabled.
- `peft_args` (`--lora`, `--qlora`, `--lora_*`, see `hfgpt.training.peft`): the output directory then holds the
  adapter in `adapter/` and, with `merge_adapter` (the default), the merged model itself.

After training, each run writes the output directory (model or adapter, tokenizer with its chat template, model card),
generates greedy answers to held-out prompts into `generations.jsonl` with their references and scores them with
ROUGE; DPO also measures reward accuracy and margins on held-out preference pairs (`hfgpt.training.preferences`).
Results go to eval_results.json.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trl

from .. import files
from ..docs_smoke import scale_down
from ..data import chat
from .common import (
    MatrixWeightDecayMixin,
    ResumeMixin,
    check_output_dir,
    end_distributed,
    report_interrupted,
    resolve_resume_checkpoint,
    save_final_model,
    training_arguments_summary,
    training_callbacks,
    training_data_record,
    write_training_summary,
)
from .preferences import preference_metrics, preference_pairs
from .sharding import ShardingMixin
from .speed import SpeedArguments, SpeedMixin, uncompile

logger = logging.getLogger(__name__)

ModelLike = Any  # a path, a Hub id, or a transformers / PEFT model
TRAINING_EXAMPLES_PER_EVAL_PROMPT = 10
MIN_EVAL_PROMPTS = 8
SFT_TASK = "instruction tuning (SFT)"
DPO_TASK = "preference tuning (DPO)"


@dataclass
class CheckpointingByDefault:
    """TRL's configs turn activation checkpointing on by default under the name transformers 5 deprecated
    (`gradient_checkpointing`), so every run printed a FutureWarning the user could do nothing about. Same default,
    under the new name; `--gradient_checkpointing` still works (and warns, as transformers does)."""

    activation_checkpointing: bool | None = field(
        default=None, metadata={"help": "Recompute activations in the backward pass to save memory (~20%% slower). "
                                        "Default (TRL's): on.", "nargs": "?", "const": True})
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of --activation_checkpointing.", "nargs": "?", "const": True})

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        super().__post_init__()


@dataclass
class HFGPTSFTConfig(CheckpointingByDefault, SpeedArguments, trl.SFTConfig):
    """TRL's `SFTConfig` with hfgpt's defaults: loss on the assistant's tokens only; bf16 where the hardware computes
    it natively (TRL's default, bf16 everywhere, fails or crawls elsewhere); torch.compile only when asked (chat rows
    have every length, so a compiled model would recompile)."""

    assistant_only_loss: bool = field(
        default=True,
        metadata={"help": "Compute the loss on the assistant's tokens only (the chat template's {%% generation %%} "
                          "blocks). hfgpt's default: True."},
    )
    # pinned memory only speeds up copies to a GPU; on a CPU, torch warns about it at every dataloader
    dataloader_pin_memory: bool = field(
        default=torch.cuda.is_available(), metadata={"help": "Pin batches in memory (helps only with a GPU)."})


# the DPO losses whose formula reads label_smoothing in TRL; the others (sigmoid among them) ignore it
LABEL_SMOOTHING_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")


@dataclass
class HFGPTDPOConfig(CheckpointingByDefault, SpeedArguments, trl.DPOConfig):
    """TRL's `DPOConfig` with bf16 only where the hardware computes it natively, and no silently ignored label
    smoothing."""

    dataloader_pin_memory: bool = field(
        default=torch.cuda.is_available(), metadata={"help": "Pin batches in memory (helps only with a GPU)."})

    def __post_init__(self):
        super().__post_init__()
        if self.label_smoothing and not set(self.loss_type) & set(LABEL_SMOOTHING_LOSSES):
            raise ValueError(
                f"label_smoothing={self.label_smoothing} has no effect with loss_type {self.loss_type}: TRL applies it "
                f"only in the {', '.join(LABEL_SMOOTHING_LOSSES)} losses. For DPO that allows for mislabelled pairs use "
                f"--loss_type robust, or set --label_smoothing 0."
            )
        if self.use_weighting and "sft" in self.loss_type:
            # TRL 1.16 scales each loss by the WPO weights in place, and its 'sft' loss is a broadcast view of one
            # number: the first training step fails deep inside TRL ("more than one element of the written-to tensor
            # refers to a single memory location")
            raise ValueError(
                f"use_weighting (WPO) does not work with the 'sft' loss in TRL (loss_type {self.loss_type}): the "
                "first step would fail. Drop 'sft' from --loss_type, or --use_weighting."
            )


class SFTTrainer(SpeedMixin, ShardingMixin, ResumeMixin, MatrixWeightDecayMixin, trl.SFTTrainer):
    """TRL's SFTTrainer with hfgpt's weight-decay rule (matrices only), tokens/s and MFU in its logs, and FSDP2 on CPU
    processes as on GPUs."""


class DPOTrainer(SpeedMixin, ResumeMixin, MatrixWeightDecayMixin, trl.DPOTrainer):
    """TRL's DPOTrainer with hfgpt's weight-decay rule (matrices only), tokens/s and MFU in its logs."""

    @property
    def reference_forwards_per_step(self) -> int:
        return 0 if self.args.precompute_ref_log_probs else 1  # the frozen reference model scores every batch


@dataclass
class AlignmentArguments:
    """What SFT and DPO share besides TRL's config: the model, the data and the held-out generation."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The model to start from: a local model directory or a Hub id."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "The tokenizer (with a chat template), if it is not saved with the model."}
    )
    train_file: list[str] | None = field(
        default=None,
        metadata={"help": "Training rows: .jsonl/.json/.csv/.tsv files (repeat the flag or separate with commas)."},
    )
    validation_file: list[str] | None = field(
        default=None,
        metadata={"help": "Held-out rows. Without it, the last --validation_split_percentage %% of the training "
                          "rows are held out."},
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Instead of --train_file: a Hub dataset id or a directory saved with "
                                        "datasets' save_to_disk."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Share of the training rows held out when there is no validation data "
                                        "(0: none)."}
    )
    eval_prompts_file: str | None = field(
        default=None,
        metadata={"help": "Prompts to answer after training, with reference answers (instruction or preference rows, "
                          ".jsonl/.csv/.tsv). Default: the held-out rows."},
    )
    max_eval_prompts: int | None = field(
        default=None, metadata={"help": "Answer at most this many held-out prompts after training (0: none). "
                                        f"Default: one per {TRAINING_EXAMPLES_PER_EVAL_PROMPT} training examples the "
                                        f"run saw, at least {MIN_EVAL_PROMPTS}, so a short run is not dwarfed by its "
                                        "evaluation."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Longest generated answer, in tokens."})
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts per generate() call."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a model or checkpoints already in --output_dir."}
    )


@dataclass
class DPOArguments(AlignmentArguments):
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "DPO's reference model. Default: a frozen copy of --model_name_or_path (with --lora: the "
                          "same weights with the adapters disabled, no copy)."},
    )


@dataclass
class AlignmentResult:
    """What a run leaves behind: the trainer (with the trained model), the output directory and its metrics."""

    trainer: Any
    output_dir: Path
    metrics: dict
    generations: list[dict]
    pairs: list[dict] = field(default_factory=list)  # DPO: the held-out pairs with their rewards (preference_pairs)


# --- model and tokenizer ----------------------------------------------------------------------------------------------


def _is_path_or_id(model: ModelLike) -> bool:
    return isinstance(model, (str, os.PathLike))


def load_model(model_name_or_path: str | os.PathLike, peft_args=None, trust_remote_code: bool = False,
               gradient_checkpointing: bool = False):
    """A causal LM from a directory or the Hub; with --qlora, quantised to 4-bit as it loads."""
    from transformers import AutoModelForCausalLM

    from .peft import load_base_model

    path = Path(model_name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (it has no config.json). Pass the output directory "
                                "of a training run, or a Hub model id.")
    return load_base_model(str(model_name_or_path), AutoModelForCausalLM, peft_args,
                           gradient_checkpointing=gradient_checkpointing, trust_remote_code=trust_remote_code)


def load_tokenizer(model: ModelLike, tokenizer: ModelLike = None, trust_remote_code: bool = False):
    """The tokenizer given, else the one saved with the model (a path, or the directory an in-memory model was
    loaded from)."""
    from transformers import PreTrainedTokenizerBase

    from ..evaluation.loading import load_tokenizer as load_tokenizer_from

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    source = tokenizer or (model if _is_path_or_id(model) else getattr(model, "name_or_path", None))
    if not source:
        raise ValueError("An in-memory model needs its tokenizer: pass `tokenizer=` (a tokenizer, a directory or a "
                         "Hub id), or --tokenizer_name_or_path.")
    return load_tokenizer_from(source, trust_remote_code=trust_remote_code)


def check_model_and_tokenizer(model, tokenizer, assistant_masks: bool) -> None:
    """Errors before training for what would otherwise fail deep inside TRL or train the wrong thing."""
    from ..tokenization import check_chat_template

    check_chat_template(tokenizer, assistant_masks=assistant_masks)
    vocab_size = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's embedding has only {vocab_size} rows. Use the "
            f"tokenizer the model was trained with, or grow the model: model.resize_token_embeddings({len(tokenizer)})."
        )


def stop_at_end_of_turn(generation_config, tokenizer) -> None:
    """The chat template ends every turn with the tokenizer's EOS: make generate() (and pipelines) stop there."""
    eos = tokenizer.eos_token_id
    if eos is None or generation_config is None:
        return
    current = generation_config.eos_token_id
    current = [] if current is None else [current] if isinstance(current, int) else list(current)
    if eos not in current:
        generation_config.eos_token_id = [eos, *current] if current else eos
    if generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def context_length(model) -> int | None:
    from ..evaluation.perplexity import model_context_length

    return model_context_length(model)


def fit_max_length(args, model) -> None:
    """TRL's max_length defaults to 1024; sequences longer than the model's context cannot be trained on, so cap it."""
    context = context_length(model)
    if context is not None and (args.max_length is None or args.max_length > context):
        if args.max_length is not None:
            logger.info("max_length %d is above the model's context; using %d.", args.max_length, context)
        args.max_length = context


# --- data -------------------------------------------------------------------------------------------------------------


def as_dataset(rows):
    """A `datasets.Dataset` from a Dataset, a list of row dicts, or None."""
    from datasets import Dataset

    if rows is None or isinstance(rows, Dataset):
        return rows
    if isinstance(rows, (list, tuple)):
        # Dataset.from_list takes its columns from the first row: give every row every field (None where absent)
        columns = list(dict.fromkeys(key for row in rows if isinstance(row, dict) for key in row))
        return Dataset.from_list([{key: row.get(key) for key in columns} if isinstance(row, dict) else row
                                  for row in rows])
    raise TypeError(f"Expected a datasets.Dataset or a list of row dicts, got {type(rows).__name__}.")


def load_rows(script_args: AlignmentArguments):
    """The train and validation rows of a script run (a `DatasetDict`), through `hfgpt.data.load_raw_datasets`."""
    from ..data import load_raw_datasets

    return load_raw_datasets(
        train_files=script_args.train_file,
        validation_files=script_args.validation_file,
        dataset_name=script_args.dataset_name,
        dataset_config_name=script_args.dataset_config_name,
        validation_split_percentage=script_args.validation_split_percentage,
    )


def held_out_prompts(rows, source: str | None = None, limit: int | None = None) -> tuple[list[list[dict]], list[str]]:
    """(prompts, references) of instruction or preference rows, through `hfgpt.data.chat.prompt_and_reference`."""
    rows = list(rows)[:limit] if limit is not None else list(rows)
    pairs = [chat.prompt_and_reference(row, index, source) for index, row in enumerate(rows)]
    return [prompt for prompt, _ in pairs], [reference for _, reference in pairs]


def check_lengths(tokenizer, prompts, limit: int | None, source: str, limit_name: str) -> None:
    if limit is not None and prompts:
        chat.check_prompt_lengths(tokenizer, prompts, limit, source=source, context_name=limit_name)


def prepare_sft_dataset(rows, tokenizer, max_length: int | None, source: str):
    dataset = chat.to_sft_dataset(as_dataset(rows), source)
    prompts = [chat.prompt_and_reference({"messages": messages})[0] for messages in dataset["messages"]]
    check_lengths(tokenizer, prompts, max_length, source, "max_length (the model's context or --max_length)")
    return dataset


def prepare_preference_dataset(rows, tokenizer, max_length: int | None, source: str):
    dataset = chat.to_preference_dataset(as_dataset(rows), source)
    check_lengths(tokenizer, dataset["prompt"], max_length, source, "max_length (the model's context or --max_length)")
    return dataset


# --- after training ---------------------------------------------------------------------------------------------------


def generate_and_score(model, tokenizer, prompts: list, references: list[str], max_new_tokens: int = 128,
                       batch_size: int = 8, source: str | None = None,
                       progress: bool = True) -> tuple[list[dict], dict]:
    """Greedy answers to chat prompts, paired with their references, and their ROUGE scores.

    Returns the rows `{"prompt", "prediction", "reference"}` and `{"rouge1", ..., "rougeL", "num_examples", ...}`."""
    import evaluate

    from ..evaluation import metric_path
    from ..evaluation.cli import generate_responses

    context = context_length(model)
    if context is not None and prompts:
        lengths = chat.check_prompt_lengths(tokenizer, prompts, context, source or "the evaluation prompts")
        room = context - max(lengths)
        if max_new_tokens > room:  # an answer cannot run past the context; stop there rather than fail after training
            logger.warning("max_new_tokens=%d does not fit after the longest prompt (%d tokens) in the model's "
                           "%d-token context; generating at most %d tokens.", max_new_tokens, max(lengths), context,
                           room)
            max_new_tokens = room
    was_training = model.training
    model.eval()
    try:
        predictions, truncated = generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    finally:
        model.train(was_training)
    rows = [{"prompt": prompt, "prediction": prediction, "reference": reference}
            for prompt, prediction, reference in zip(prompts, predictions, references)]
    scores = evaluate.load(metric_path("rouge")).compute(predictions=predictions, references=references)
    scores.update(num_examples=len(rows), max_new_tokens=max_new_tokens, truncated_prompts=truncated)
    return rows, scores


# --- saving -----------------------------------------------------------------------------------------------------------


def _base_model_path(model) -> str | None:
    """Where a PEFT model's base can be reloaded from (a directory or Hub id), or None for an in-memory base."""
    config = model.peft_config.get("default") if hasattr(model, "peft_config") else None
    return getattr(config, "base_model_name_or_path", None) or None


def save_outputs(trainer, tokenizer, output_dir: str | os.PathLike, merge_adapter: bool = True) -> dict:
    """Write the trained model into `output_dir`: the whole model, or for LoRA the adapter in `adapter/` and (with
    `merge_adapter`) the merged model itself. Tokenizer and chat template go with each. Returns what was written."""
    from peft import PeftModel

    from .peft import save_adapter, save_adapter_and_merge

    output_dir = Path(output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    stop_at_end_of_turn(getattr(model, "generation_config", None), tokenizer)
    if not isinstance(model, PeftModel):
        save_final_model(trainer, output_dir)
        return {"model": str(output_dir)}
    if _base_model_path(model):
        adapter_dir = save_adapter_and_merge(model, output_dir, tokenizer, merge=merge_adapter)
    else:  # the base exists only in memory: nothing to reload it from, so merge the trained copy here
        adapter_dir = save_adapter(model, output_dir, tokenizer)
        if merge_adapter:
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
    written = {"adapter": str(adapter_dir)}
    if merge_adapter:
        stop_at_end_of_turn_in_dir(output_dir, tokenizer)
        written["model"] = str(output_dir)
    return written


def stop_at_end_of_turn_in_dir(model_dir: Path, tokenizer) -> None:
    """The merged model is written from a reloaded base: give its saved generation config the end-of-turn stop too."""
    from transformers import GenerationConfig

    if not (Path(model_dir) / "generation_config.json").is_file():
        return
    generation_config = GenerationConfig.from_pretrained(model_dir)
    stop_at_end_of_turn(generation_config, tokenizer)
    generation_config.save_pretrained(model_dir)


# --- the runs ---------------------------------------------------------------------------------------------------------


def _source_name(data_source: dict, key: str, default: str) -> str:
    """How messages and results name a part of the data ("train": a file, a list of files or a dataset name)."""
    value = data_source.get(key)
    if isinstance(value, (list, tuple)):
        value = ", ".join(map(str, value))
    return value or default


@dataclass
class PreparedRun:
    """A TRL trainer ready to train, and what the end of the run needs to know."""

    trainer: Any
    tokenizer: Any
    base_model: str | None  # the directory or Hub id the model was loaded from (None: given in memory)
    peft_args: Any  # hfgpt's PeftArguments for a LoRA / QLoRA run, else None
    resume_checkpoint: str | None
    details: dict  # what the summary records about the data and the method


def _load_and_check(model: ModelLike, tokenizer: ModelLike, args, peft_args, overwrite_output_dir: bool):
    """Load (or take) the model and tokenizer, check them, cap max_length, check the output directory; the LoRA
    config to hand TRL (or None)."""
    from .peft import PeftArguments, lora_config

    if peft_args is not None and not isinstance(peft_args, PeftArguments):
        raise TypeError(f"peft_args must be hfgpt.training.peft.PeftArguments (e.g. PeftArguments(lora=True)), got "
                        f"{type(peft_args).__name__}.")
    if peft_args is not None and not peft_args.lora:
        peft_args = None
    base_model = None
    if _is_path_or_id(model):
        base_model = str(model)
        model = load_model(model, peft_args, trust_remote_code=args.trust_remote_code,
                           gradient_checkpointing=args.gradient_checkpointing)
    elif peft_args is not None and peft_args.qlora:
        raise ValueError("--qlora quantises the weights while the model loads: pass the model as a directory or Hub "
                         "id, not as an in-memory model.")
    tokenizer = load_tokenizer(base_model or model, tokenizer, trust_remote_code=args.trust_remote_code)
    check_model_and_tokenizer(model, tokenizer, assistant_masks=bool(getattr(args, "assistant_only_loss", False)))
    fit_max_length(args, model)
    resume = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    check_output_dir(args.output_dir, model.config, resume, overwrite_output_dir)
    peft_config = None if peft_args is None else lora_config(model, peft_args, "CAUSAL_LM")
    return model, tokenizer, base_model, peft_config, peft_args, resume


def build_sft_trainer(model: ModelLike, train_dataset, args: trl.SFTConfig, tokenizer: ModelLike = None,
                      eval_dataset=None, peft_args=None, overwrite_output_dir: bool = False,
                      data_source: dict | None = None) -> PreparedRun:
    """Everything `run_sft` does before training: load and check, format the rows, build TRL's SFTTrainer."""
    model, tokenizer, base_model, peft_config, peft_args, resume = _load_and_check(
        model, tokenizer, args, peft_args, overwrite_output_dir)
    data_source = data_source or {}
    train = prepare_sft_dataset(train_dataset, tokenizer, args.max_length,
                                _source_name(data_source, "train", "the training rows"))
    evaluation = None
    if eval_dataset is not None:
        evaluation = prepare_sft_dataset(eval_dataset, tokenizer, args.max_length,
                                         _source_name(data_source, "validation", "the validation rows"))
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                         processing_class=tokenizer, peft_config=peft_config,
                         callbacks=training_callbacks("Instruction tuning (SFT) loss"))
    details = {
        "train_rows": len(train),
        "validation_rows": None if evaluation is None else len(evaluation),
        "sft": {"assistant_only_loss": args.assistant_only_loss, "packing": args.packing,
                "max_length": args.max_length},
    }
    return PreparedRun(trainer, tokenizer, base_model, peft_args, resume, details)


def load_reference_model(ref_model: ModelLike, trust_remote_code: bool = False):
    if ref_model is None or not _is_path_or_id(ref_model):
        return ref_model
    return load_model(ref_model, trust_remote_code=trust_remote_code)


def build_dpo_trainer(model: ModelLike, train_dataset, args: trl.DPOConfig, tokenizer: ModelLike = None,
                      eval_dataset=None, ref_model: ModelLike = None, peft_args=None,
                      overwrite_output_dir: bool = False, data_source: dict | None = None) -> PreparedRun:
    """Everything `run_dpo` does before training: load and check, choose the reference, format the pairs, build
    TRL's DPOTrainer."""
    model, tokenizer, base_model, peft_config, peft_args, resume = _load_and_check(
        model, tokenizer, args, peft_args, overwrite_output_dir)
    data_source = data_source or {}
    reference = load_reference_model(ref_model, args.trust_remote_code)
    if reference is None and peft_config is None:
        # a frozen copy; TRL would reload it from config._name_or_path, which an in-memory model does not have
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        reference_name = "a frozen copy of the starting model"
    elif reference is None:
        reference_name = "the policy with its LoRA adapters disabled (no copy)"
    else:
        reference_name = str(ref_model) if _is_path_or_id(ref_model) else "given in memory"
        check_model_and_tokenizer(reference, tokenizer, assistant_masks=False)
    train = prepare_preference_dataset(train_dataset, tokenizer, args.max_length,
                                       _source_name(data_source, "train", "the training pairs"))
    evaluation = None
    if eval_dataset is not None:
        evaluation = prepare_preference_dataset(eval_dataset, tokenizer, args.max_length,
                                                _source_name(data_source, "validation", "the held-out pairs"))
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=train, eval_dataset=evaluation,
                         processing_class=tokenizer, peft_config=peft_config,
                         callbacks=training_callbacks("Preference tuning (DPO) loss"))
    details = {
        "train_rows": len(train),
        "validation_rows": None if evaluation is None else len(evaluation),
        "dpo": {"beta": args.beta, "loss_type": list(args.loss_type), "max_length": args.max_length,
                "reference_model": reference_name},
    }
    return PreparedRun(trainer, tokenizer, base_model, peft_args, resume, details)


@dataclass
class GenerationSettings:
    """How the held-out prompts are answered after training. `max_eval_prompts=None`: all of them, or with
    `scale_to_run` (the commands' default) as many as `eval_prompts_for_run` allows."""

    max_eval_prompts: int | None = None
    max_new_tokens: int = 128
    batch_size: int = 8
    scale_to_run: bool = False


def eval_prompts_for_run(training_examples: int) -> int:
    """How many held-out prompts the commands answer by default: answering one (greedy decoding, a forward per
    token) costs about what training on several examples does, so one per TRAINING_EXAMPLES_PER_EVAL_PROMPT examples
    keeps the evaluation a fraction of the run, with MIN_EVAL_PROMPTS for a ROUGE worth reading."""
    return max(MIN_EVAL_PROMPTS, training_examples // TRAINING_EXAMPLES_PER_EVAL_PROMPT)


def train_and_finish(task: str, run: PreparedRun, eval_prompts=None, generation: GenerationSettings | None = None,
                     data_source: dict | None = None, push_to_hub: bool = False) -> AlignmentResult:
    """Train; save; evaluate on the held-out rows; answer the held-out prompts and score them; write the summary and
    the model card (and push the directory when asked)."""
    from ..hub import finish_model_dir
    from .peft import run_report

    trainer, args = run.trainer, run.trainer.args
    generation = generation or GenerationSettings()
    data_source = data_source or {}
    output_dir = Path(args.output_dir)
    metrics = {"train": trainer.train(resume_from_checkpoint=run.resume_checkpoint).metrics}
    uncompile(trainer.model)  # evaluation and generation below have other shapes than the training batches
    pairs = []
    if trainer.eval_dataset is not None:
        if isinstance(trainer, trl.DPOTrainer):
            pairs = preference_pairs(trainer)
            metrics["preference"] = preference_metrics(trainer, pairs)
            if args.should_save:
                files.write_jsonl(output_dir / files.PREFERENCE_PAIRS, pairs)
            logger.info("DPO held-out pairs: the policy prefers the rejected answer in %d of %d (%s)",
                        sum(not pair["prefers_chosen"] for pair in pairs), len(pairs),
                        output_dir / files.PREFERENCE_PAIRS)
        else:
            metrics["validation"] = trainer.evaluate()
    written = save_outputs(trainer, run.tokenizer, output_dir,
                           merge_adapter=run.peft_args is None or run.peft_args.merge_adapter)

    generations = []
    source = _source_name(data_source, "eval_prompts", "the held-out prompts")
    limit = generation.max_eval_prompts
    if limit is None and generation.scale_to_run:
        seen = trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps \
            * args.world_size
        limit = eval_prompts_for_run(seen)
    prompts, references = held_out_prompts(eval_prompts or [], source, limit)
    if prompts and args.should_save:
        available = len(eval_prompts or [])
        print(f"Answering {len(prompts)} of {available} held-out prompts ({source}) with up to "
              f"{generation.max_new_tokens} new tokens each" + (
                  f"; by default one per {TRAINING_EXAMPLES_PER_EVAL_PROMPT} training examples, --max_eval_prompts "
                  "sets the number" if limit is not None and generation.max_eval_prompts is None else "") + ".")
    if prompts:
        generations, rouge = generate_and_score(trainer.model, run.tokenizer, prompts, references,
                                                generation.max_new_tokens, generation.batch_size, source,
                                                progress=not args.disable_tqdm)
        metrics["rouge"] = rouge
        if args.should_save:
            files.write_jsonl(output_dir / files.GENERATIONS, generations)
            files.update_eval_results(output_dir, "rouge", {**rouge, "dataset": {"name": source}})
    elif generation.max_eval_prompts == 0:
        logger.info("--max_eval_prompts 0: no held-out generations.")
    else:
        logger.warning("No held-out prompts (no validation rows and no --eval_prompts_file): nothing generated.")
    if "preference" in metrics and args.should_save:
        files.update_eval_results(output_dir, "preference", {
            **metrics["preference"],
            "dataset": {"name": _source_name(data_source, "validation", "the held-out pairs")}})

    summary = {
        "task": task,
        "base_model": run.base_model,
        "dataset_name": data_source.get("train"),
        **training_data_record(data_source.get("train_files")),
        **run.details,
        "outputs": written,
        "training_arguments": training_arguments_summary(args),
        "final_metrics": {key: value for key, value in metrics["train"].items() if isinstance(value, (int, float))},
        "run": run_report(trainer.model, peft_args=run.peft_args),
        "speed": trainer.speed_summary(metrics["train"].get("train_runtime")),
    }
    if args.should_save:
        write_training_summary(output_dir, summary)
        finish_model_dir(output_dir, push_to_hub=push_to_hub, hub_model_id=args.hub_model_id,
                         hub_token=args.hub_token, hub_private_repo=args.hub_private_repo)
    return AlignmentResult(trainer=trainer, output_dir=output_dir, metrics=metrics, generations=generations,
                           pairs=pairs)


def run_sft(model: ModelLike, train_dataset, args: trl.SFTConfig, tokenizer: ModelLike = None, eval_dataset=None,
            eval_prompts=None, peft_args=None, generation: GenerationSettings | None = None,
            overwrite_output_dir: bool = False, data_source: dict | None = None) -> AlignmentResult:
    """Supervised fine-tuning on instruction rows with TRL's SFTTrainer.

    Args:
        model: a model directory, a Hub id, or an in-memory causal LM (trained in place).
        train_dataset / eval_dataset: instruction rows (a `datasets.Dataset` or a list of dicts) in any shape
            `hfgpt.data.chat.conversation` reads.
        args: TRL's `SFTConfig` (or `HFGPTSFTConfig`: assistant-only loss on, bf16 only where supported).
        tokenizer: a tokenizer with a chat template, or where to load it; default: the model's.
        eval_prompts: rows to answer after training (default: `eval_dataset`); answers go to generations.jsonl.
        peft_args: `hfgpt.training.peft.PeftArguments` (--lora / --qlora / --lora_* / --merge_adapter).
        generation: how many held-out prompts to answer, and how long the answers may be.
        data_source: names of the data for the summary and card: {"train": ..., "validation": ..., "eval_prompts": ...}.
    """
    push_to_hub, args.push_to_hub = args.push_to_hub, False  # hfgpt writes the card, then pushes the whole directory
    run = build_sft_trainer(model, train_dataset, args, tokenizer, eval_dataset, peft_args, overwrite_output_dir,
                            data_source)
    return train_and_finish(SFT_TASK, run, eval_dataset if eval_prompts is None else eval_prompts,
                            generation, data_source, push_to_hub)


def run_dpo(model: ModelLike, train_dataset, args: trl.DPOConfig, tokenizer: ModelLike = None, eval_dataset=None,
            ref_model: ModelLike = None, eval_prompts=None, peft_args=None,
            generation: GenerationSettings | None = None, overwrite_output_dir: bool = False,
            data_source: dict | None = None) -> AlignmentResult:
    """Direct preference optimisation on preference rows with TRL's DPOTrainer.

    The reference model is `ref_model` (a model, directory or Hub id) if given; else, with LoRA, the policy itself
    with its adapters disabled (no second copy in memory); else a frozen copy of the starting model. `args.beta` and
    `args.loss_type` choose the objective. After training, the held-out pairs (`eval_dataset`) give the reward
    accuracy and margins (`metrics["preference"]`), and their prompts (or `eval_prompts`) are answered and scored
    against the chosen answers. Other arguments as in `run_sft`.
    """
    push_to_hub, args.push_to_hub = args.push_to_hub, False
    run = build_dpo_trainer(model, train_dataset, args, tokenizer, eval_dataset, ref_model, peft_args,
                            overwrite_output_dir, data_source)
    return train_and_finish(DPO_TASK, run, eval_dataset if eval_prompts is None else eval_prompts,
                            generation, data_source, push_to_hub)


# --- command line -----------------------------------------------------------------------------------------------------


def _parse(config_class, arguments_class, argv, prog):
    from transformers import HfArgumentParser

    from .peft import PeftArguments

    parser = HfArgumentParser((arguments_class, PeftArguments, config_class), prog=prog, description=(
        f"{prog}: train, then answer held-out prompts greedily and score them with ROUGE (generations.jsonl). "
        f"The answers cost time: by default one prompt per {TRAINING_EXAMPLES_PER_EVAL_PROMPT} training examples "
        f"the run saw (at least {MIN_EVAL_PROMPTS}, at most all); --max_eval_prompts N sets the number, 0 skips them."))
    script_args, peft_args, args = parser.parse_args_into_dataclasses(args=argv)
    if not script_args.model_name_or_path:
        parser.error("--model_name_or_path is required (a model directory or a Hub id)")
    if not (script_args.train_file or script_args.dataset_name):
        parser.error("give the training rows with --train_file (or --dataset_name)")
    return scale_down(prog, script_args, peft_args, args)


def _script_inputs(script_args: AlignmentArguments):
    """Rows, held-out rows, evaluation prompts and their names, from the command-line arguments."""
    from ..data import split_file_list

    raw = load_rows(script_args)
    train_files = split_file_list(script_args.train_file)
    validation_files = split_file_list(script_args.validation_file)
    held_out = raw.get("validation")
    data_source = {
        "train": train_files or script_args.dataset_name,
        "validation": (", ".join(validation_files) if validation_files else
                       f"{script_args.validation_split_percentage:g}% of the training rows" if held_out else None),
        "eval_prompts": script_args.eval_prompts_file,
        "train_files": train_files,  # fingerprinted into the summary, so that `hfgpt eval` recognises them
    }
    eval_prompts = files.read_rows(script_args.eval_prompts_file) if script_args.eval_prompts_file else None
    if eval_prompts is None and held_out is not None:
        data_source["eval_prompts"] = data_source["validation"]
    generation = GenerationSettings(script_args.max_eval_prompts, script_args.max_new_tokens,
                                    script_args.generation_batch_size, scale_to_run=True)
    return raw["train"], held_out, eval_prompts, data_source, generation


def _report(result: AlignmentResult) -> None:
    shown = {name: {key: value for key, value in values.items() if isinstance(value, (int, float, str))}
             for name, values in result.metrics.items()}
    print(json.dumps(shown, indent=2))
    print(f"Saved to {result.output_dir}")


def _prepare_from_command_line(build, script_args, peft_args, args, **extra):
    """Data, held-out prompts and the trainer; every check on the user's input happens here, before training."""
    train, held_out, eval_prompts, data_source, generation = _script_inputs(script_args)
    push_to_hub, args.push_to_hub = args.push_to_hub, False  # hfgpt pushes the finished directory itself
    run = build(script_args.model_name_or_path, train, args, tokenizer=script_args.tokenizer_name_or_path,
                eval_dataset=held_out, peft_args=peft_args, overwrite_output_dir=script_args.overwrite_output_dir,
                data_source=data_source, **extra)
    return run, (held_out if eval_prompts is None else eval_prompts), generation, data_source, push_to_hub


def _command(prog: str, task: str, build, config_class, arguments_class, argv, **extra_from_args) -> int:
    script_args, peft_args, args = _parse(config_class, arguments_class, argv, prog)
    extra = {name: getattr(script_args, attribute) for name, attribute in extra_from_args.items()}
    try:
        run, eval_prompts, generation, data_source, push_to_hub = _prepare_from_command_line(
            build, script_args, peft_args, args, **extra)
    except (FileNotFoundError, ValueError) as error:  # bad input: a message, not a traceback
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    try:
        _report(train_and_finish(task, run, eval_prompts, generation, data_source, push_to_hub))
    except KeyboardInterrupt:  # Ctrl-C: where to resume from, not a traceback
        return report_interrupted(prog, args.output_dir, argv)
    end_distributed()
    return 0


def sft_main(argv: list[str] | None = None) -> int:
    """`hfgpt sft` / `python train/sft.py`: every SFTConfig field plus the AlignmentArguments and --lora/--qlora."""
    return _command("hfgpt sft", SFT_TASK, build_sft_trainer, HFGPTSFTConfig, AlignmentArguments, argv)


def dpo_main(argv: list[str] | None = None) -> int:
    """`hfgpt dpo` / `python train/dpo.py`: every DPOConfig field (--beta, --loss_type ...) plus the DPOArguments
    (--ref_model_name_or_path ...) and --lora/--qlora."""
    return _command("hfgpt dpo", DPO_TASK, build_dpo_trainer, HFGPTDPOConfig, DPOArguments, argv,
                    ref_model="ref_model_name_or_path")


__all__ = [
    "AlignmentArguments",
    "AlignmentResult",
    "DPOArguments",
    "DPOTrainer",
    "GenerationSettings",
    "HFGPTDPOConfig",
    "HFGPTSFTConfig",
    "PreparedRun",
    "SFTTrainer",
    "build_dpo_trainer",
    "build_sft_trainer",
    "dpo_main",
    "generate_and_score",
    "preference_metrics",
    "preference_pairs",
    "run_dpo",
    "run_sft",
    "sft_main",
    "train_and_finish",
]

"""Pretraining an hfgpt causal language model from text with `datasets` + `Trainer`.

    hfgpt pretrain                                             # the quickstart: Python's docstrings, a new tokenizer
    hfgpt pretrain --train_file corpus.txt --preset small --output_dir out/my-gpt
    accelerate launch --config_file train/accelerate/ddp.yaml train/pretrain.py --train_file ... (multi-GPU)

Arguments are every `TrainingArguments` field (with pretraining defaults, see `PretrainingArguments`) plus the model
and data arguments of `PretrainArguments`. The steps:

    rows (hfgpt.data.load_raw_datasets, or the default corpus)  ->  tokenizer (given, from the checkpoint, or trained)
    -> config (preset + overrides) -> packed blocks (hfgpt.data.build_lm_datasets) -> Trainer (AdamW with decay on
    matrices, warmup + cosine, clipping, accumulation, eval loss + perplexity) -> the model directory: weights, config,
    code, tokenizer, generation config, training_summary.json, log_history.json/.csv, loss_curve.png, TensorBoard
    logs, model card.
"""

from __future__ import annotations

import inspect
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import IntervalStrategy, SchedulerType

from .. import HFGPTConfig, HFGPTForCausalLM
from ..data import (
    PackedBlockCollator,
    build_lm_datasets,
    check_block_size,
    hold_out_validation,
    load_raw_datasets,
    split_file_list,
)
from ..data.default_corpus import DESCRIPTION as DEFAULT_CORPUS_DESCRIPTION
from ..data.default_corpus import default_corpus
from ..data.sources import SAMPLE_BY, VALIDATION_SPLIT, DataError
from ..docs_smoke import scale_down
from ..generation import generate
from ..hub import finish_model_dir
from .sharding import ShardingMixin, reshard
from .speed import SpeedArguments, SpeedMixin, uncompile
from .common import (
    MatrixWeightDecayMixin,
    ResumeMixin,
    PerplexityMixin,
    check_distributed_setup,
    check_mixed_precision,
    check_output_dir,
    end_distributed,
    perplexity,
    report_interrupted,
    resolve_resume_checkpoint,
    save_final_model,
    training_arguments_summary,
    training_callbacks,
    training_data_record,
    use_cpu_for_multiple_cpu_processes,
    warn_if_sharding_is_ignored,
    write_training_summary,
)

TASK = "causal language modeling (pretraining)"


@dataclass
class PretrainArguments:
    """The model and the data. (Training hyper-parameters are the `TrainingArguments` fields.)"""

    preset: str = field(default="mini", metadata={"help": f"Model shape: one of {', '.join(HFGPTConfig.presets())}."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Config fields to change, as 'key=value,key=value' (e.g. 'num_hidden_layers=4,"
                          "position_embedding_type=rope'). Values are parsed as int, float, bool or None when possible."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "A tokenizer directory or Hub id. Default: train a new byte-level BPE."})
    vocab_size: int | None = field(
        default=None, metadata={"help": "Vocabulary size of the tokenizer trained when no --tokenizer_name_or_path "
                                        "is given (default: the preset's vocab_size)."})
    tokenizer_max_chars: int = field(
        default=20_000_000, metadata={"help": "Train a new tokenizer on at most this many characters of the corpus."})
    train_file: list[str] | None = field(
        default=None, metadata={"help": "Training text: .txt, .jsonl, .json, .csv or .tsv files (globs allowed); "
                                        "repeat the flag or separate paths with commas.", "action": "extend"})
    validation_file: list[str] | None = field(
        default=None, metadata={"help": "Validation files (same formats).", "action": "extend"})
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset id (e.g. 'wikitext') or a directory written by save_to_disk."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    text_column: str = field(default="text", metadata={"help": "The column that holds the text."})
    sample_by: str = field(
        default="paragraph",
        metadata={"help": f"What one document of a .txt file is: {', '.join(SAMPLE_BY)}. Documents are separated "
                          "by EOS and do not attend to each other."})
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percentage of the training rows held out for validation when there is no "
                                       "validation file or split (0: no validation)."})
    block_size: int | None = field(
        default=None, metadata={"help": "Tokens per training sequence (default: the model's max_position_embeddings)."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream the data instead of loading it (needs --max_steps)."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenizing and packing (datasets.map num_proc)."})
    default_corpus_max_chars: int | None = field(
        default=None, metadata={"help": "Without --train_file / --dataset_name hfgpt trains on the docstrings of "
                                        "Python's standard library; this caps their characters."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace the model or checkpoints already in --output_dir."})
    num_samples: int = field(default=3, metadata={"help": "Sample generations printed at the end (0: none)."})
    sample_max_new_tokens: int = field(default=60, metadata={"help": "Length of each sample generation."})

    def __post_init__(self):
        self.train_file = split_file_list(self.train_file) or None
        self.validation_file = split_file_list(self.validation_file) or None
        if self.tokenizer_name_or_path and self.vocab_size:
            raise ValueError("Pass either --tokenizer_name_or_path (use that tokenizer) or --vocab_size (train a new "
                             "one), not both.")
        if self.sample_by not in SAMPLE_BY:
            raise ValueError(f"--sample_by {self.sample_by!r}: choose one of {', '.join(SAMPLE_BY)}.")


@dataclass
class PretrainingArguments(SpeedArguments, TrainingArguments):
    """`TrainingArguments` with defaults for pretraining a small model: AdamW (decay 0.1 on matrices, beta2 0.95),
    peak learning rate 1e-3 with 5% linear warmup then cosine decay, clipping at 1.0, validation every 20% of the run,
    checkpoints every 25% (two kept), TensorBoard logs; bf16 where the hardware computes it natively, and
    torch.compile (every block has the same shape, so the model compiles once)."""

    compile_by_default = True

    output_dir: str | None = field(default="out/pretrain", metadata={"help": "Where the model and logs go."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "Learning rate schedule after warmup."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup steps (int), or a fraction of the run (<1)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay, on weight matrices only."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Blocks per device per step."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Blocks per device per eval step."})
    # 3, not 2, since bf16 by default: the main job's third epoch costs less than the fp32 run's second one did
    # (bench/main_job.py: 159 s and perplexity 174 against fp32's 2 epochs, 189 s and 229)
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs over the training blocks."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps (or a fraction of the run)."})
    eval_strategy: IntervalStrategy | str = field(default="steps", metadata={"help": "When to evaluate: no, steps, epoch."})
    eval_steps: float | None = field(default=0.2, metadata={"help": "Evaluate every N steps (or a fraction)."})
    save_steps: float = field(default=0.25, metadata={"help": "Checkpoint every N steps (or a fraction)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (older ones are deleted)."})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "Loggers: tensorboard, none..."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Every hfgpt parameter takes part in the loss, so DDP need not search."})
    dataloader_pin_memory: bool = field(
        default=torch.cuda.is_available(), metadata={"help": "Pin batches in memory (helps only with a GPU)."})

    def __post_init__(self):
        use_cpu_for_multiple_cpu_processes(self)
        super().__post_init__()


def parse_config_overrides(text: str | None) -> dict:
    """'a=1,b=rope,c=true' -> {'a': 1, 'b': 'rope', 'c': True}."""
    overrides = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"--config_overrides: {item.strip()!r} is not key=value (expected e.g. "
                             "'num_hidden_layers=4,hidden_size=256').")
        key, value = (part.strip() for part in item.split("=", 1))
        overrides[key] = _parse_value(value)
    return overrides


def _parse_value(value: str):
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def build_config(preset: str, overrides: dict, tokenizer: PreTrainedTokenizerBase | None) -> HFGPTConfig:
    """The preset, sized to the tokenizer, with its special tokens, then the user's overrides. With no tokenizer yet,
    the preset and the overrides alone: the same checks, before any time goes into data or a tokenizer."""
    known = ({name for name in inspect.signature(HFGPTConfig.__init__).parameters if name not in ("self", "kwargs")}
             | set(HFGPTConfig().to_dict()) | set(HFGPTConfig.attribute_map))
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"--config_overrides: unknown config field(s) {', '.join(unknown)}; HFGPTConfig fields "
                         f"include {', '.join(sorted(k for k in HFGPTConfig().to_dict() if not k.startswith('_')))}.")
    tokens = {} if tokenizer is None else dict(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    config = HFGPTConfig.from_preset(preset, **{**tokens, **overrides})
    if tokenizer is not None and config.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens; "
                         "remove vocab_size from --config_overrides (it is taken from the tokenizer).")
    return config


def _texts(split, column: str, max_chars: int) -> Iterator[list[str]]:
    """Batches of non-empty texts from a split, up to about `max_chars` characters (the tokenizer trainer's input)."""
    total = 0
    for batch in split.iter(batch_size=1000):
        texts = [text for text in batch[column] if isinstance(text, str) and text]
        if texts:
            yield texts
        total += sum(map(len, texts))
        if total >= max_chars:
            return


def load_or_train_tokenizer(args: PretrainArguments, training_args: TrainingArguments, raw,
                            resume_checkpoint: str | None) -> tuple[PreTrainedTokenizerBase, str]:
    """The tokenizer and where it came from. Resuming reuses the checkpoint's tokenizer. A new tokenizer is trained
    on the main process only, saved into the output directory, and read from there by the other processes."""
    if resume_checkpoint and (Path(resume_checkpoint) / "tokenizer.json").is_file():
        # the checkpoint is deleted once the run ends: name what the tokenizer is, not where it was read from
        return (AutoTokenizer.from_pretrained(resume_checkpoint),
                f"the interrupted run's, resumed from {Path(resume_checkpoint).name} (saved with this model)")
    if args.tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path)
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer {args.tokenizer_name_or_path} has no EOS token, which separates packed "
                             "documents; use another tokenizer or train one with --vocab_size.")
        return tokenizer, args.tokenizer_name_or_path
    from ..tokenization import train_tokenizer

    vocab_size = args.vocab_size or HFGPTConfig.from_preset(args.preset).vocab_size
    source = f"byte-level BPE trained on the training split (vocab_size={vocab_size})"
    if training_args.world_size > 1 and training_args.process_index != 0:
        return AutoTokenizer.from_pretrained(_shared_tokenizer_dir(training_args)), source
    print(f"Training a byte-level BPE tokenizer (vocab_size={vocab_size}) on the training split...")
    tokenizer = train_tokenizer(_texts(raw["train"], args.text_column, args.tokenizer_max_chars),
                                vocab_size=vocab_size,
                                # tokenizers' bars draw only on a terminal; elsewhere they leave blank lines in logs
                                show_progress=not training_args.disable_tqdm and sys.stderr.isatty())
    if training_args.world_size > 1:
        tokenizer.save_pretrained(_shared_tokenizer_dir(training_args))
    return tokenizer, source


def _shared_tokenizer_dir(training_args: TrainingArguments) -> Path:
    return Path(training_args.output_dir) / ".tokenizer-for-other-processes"


def load_training_rows(args: PretrainArguments):
    """The raw rows and a description of the data for the training summary."""
    if args.train_file or args.dataset_name:
        raw = load_raw_datasets(
            train_files=args.train_file, validation_files=args.validation_file, dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            validation_split_percentage=args.validation_split_percentage, streaming=args.streaming,
            required_columns=[args.text_column], sample_by=args.sample_by,
        )
        return raw, {"dataset_name": args.dataset_name, "train_files": args.train_file,
                     "validation_files": args.validation_file, **training_data_record(args.train_file)}
    if args.validation_file or args.streaming:
        raise DataError("--validation_file / --streaming need training data: pass --train_file or --dataset_name.")
    print(f"No --train_file or --dataset_name: training on the {DEFAULT_CORPUS_DESCRIPTION}.")
    corpus = default_corpus(max_chars=args.default_corpus_max_chars)
    args.text_column = "text"
    if args.validation_split_percentage > 0:
        raw = hold_out_validation(corpus, args.validation_split_percentage)
    else:
        from datasets import DatasetDict

        raw = DatasetDict({"train": corpus})
    return raw, {"dataset": DEFAULT_CORPUS_DESCRIPTION}


class PretrainingTrainer(SpeedMixin, ShardingMixin, ResumeMixin, MatrixWeightDecayMixin, PerplexityMixin, Trainer):
    """Trainer with weight decay on matrices only, perplexity at every evaluation, tokens/s and MFU in every log, and
    FSDP2 on CPU processes as on GPUs."""


def sample_generations(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, seed: int) -> list[str]:
    """One sampled continuation per prompt; every prompt starts with EOS, as every training document does."""
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    texts = []
    for prompt in prompts:
        ids = [tokenizer.eos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        input_ids = torch.tensor([ids], device=device)
        with torch.no_grad():
            output = generate(model, input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, top_k=50,
                              temperature=0.8, max_new_tokens=max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        texts.append(tokenizer.decode(output[0, 1:], skip_special_tokens=True))
    return texts


@dataclass
class PretrainingRun:
    """Everything `prepare_pretraining` set up, ready for `train_and_save`."""

    args: PretrainArguments
    training_args: PretrainingArguments
    trainer: PretrainingTrainer
    tokenizer: PreTrainedTokenizerBase
    block_size: int
    resume_checkpoint: str | None
    summary: dict  # what training_summary.json records about the data, tokenizer and model
    started: float


def prepare_pretraining(args: PretrainArguments, training_args: PretrainingArguments,
                        callbacks: Sequence = ()) -> PretrainingRun:
    """Load the data, get a tokenizer, build the config, pack the blocks and the Trainer. Every check on the user's
    input happens here, before any training (errors: DataError, FileNotFoundError, ValueError)."""
    started = time.time()
    check_distributed_setup(training_args)
    check_mixed_precision(training_args)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    resume_checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, output_dir)
    if args.streaming and training_args.max_steps <= 0:
        raise ValueError("--streaming data has no length, so the run needs --max_steps.")
    overrides = parse_config_overrides(args.config_overrides)
    # everything that needs no data fails now, not after the corpus is read and a tokenizer trained
    early_config = build_config(args.preset, overrides, tokenizer=None)
    check_block_size(args.block_size or early_config.max_position_embeddings, early_config.max_position_embeddings)
    if training_args.process_index == 0:
        check_output_dir(output_dir, early_config, resume_checkpoint, args.overwrite_output_dir, before_tokenizer=True)

    raw, data_description = load_training_rows(args)
    with training_args.main_process_first(desc="tokenizer", local=False):
        tokenizer, tokenizer_source = load_or_train_tokenizer(args, training_args, raw, resume_checkpoint)
    config = build_config(args.preset, overrides, tokenizer)
    block_size = args.block_size or config.max_position_embeddings
    check_block_size(block_size, config.max_position_embeddings)
    tokenizer.model_max_length = config.max_position_embeddings
    if training_args.process_index == 0:
        check_output_dir(output_dir, config, resume_checkpoint, args.overwrite_output_dir)

    with training_args.main_process_first(desc="tokenizing and packing"):
        blocks = build_lm_datasets(raw, tokenizer, block_size, args.text_column, args.preprocessing_num_workers)
    if args.streaming:
        blocks["train"] = blocks["train"].shuffle(seed=training_args.seed, buffer_size=10_000)
    has_validation = VALIDATION_SPLIT in blocks
    if not has_validation and training_args.eval_strategy != IntervalStrategy.NO:
        print("No validation split (--validation_split_percentage 0 and no validation file): not evaluating.")
        training_args.eval_strategy = IntervalStrategy.NO

    model = HFGPTForCausalLM(config)
    model.generation_config.update(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                   pad_token_id=config.pad_token_id)
    num_blocks = len(blocks["train"]) if isinstance(blocks["train"], Dataset) else None
    if training_args.process_index == 0:
        print(f"Model: {model.num_parameters() / 1e6:.2f}M parameters ({args.preset} preset"
              f"{', ' + args.config_overrides if args.config_overrides else ''}); block size {block_size}; "
              f"{num_blocks if num_blocks is not None else 'streamed'} training blocks.")
    trainer = PretrainingTrainer(
        model=model,
        args=training_args,
        train_dataset=blocks["train"],
        eval_dataset=blocks[VALIDATION_SPLIT] if has_validation else None,
        processing_class=tokenizer,
        data_collator=PackedBlockCollator(),
        callbacks=[*training_callbacks(f"hfgpt pretraining: {output_dir.name}"), *callbacks],
    )
    warn_if_sharding_is_ignored(trainer)
    summary = {
        "task": TASK,
        **{key: value for key, value in data_description.items() if value},
        "text_column": args.text_column,
        "tokenizer": tokenizer_source,
        "preset": args.preset,
        "config_overrides": args.config_overrides,
        "num_parameters": model.num_parameters(),
        "block_size": block_size,
        "training_blocks": num_blocks,
    }
    return PretrainingRun(args, training_args, trainer, tokenizer, block_size, resume_checkpoint, summary, started)


def train_and_save(run: PretrainingRun) -> dict:
    """Train (resuming if asked), evaluate, save the model directory; returns the final metrics."""
    args, training_args, trainer = run.args, run.training_args, run.trainer
    output_dir = Path(training_args.output_dir)
    train_output = trainer.train(resume_from_checkpoint=run.resume_checkpoint)
    metrics = {"train_loss": train_output.training_loss, "global_step": train_output.global_step,
               **{key: value for key, value in train_output.metrics.items() if key != "train_loss"}}
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    metrics["wall_time_seconds"] = round(time.time() - run.started, 1)
    uncompile(trainer.model)  # sample generation below has other shapes than the training blocks

    save_final_model(trainer, output_dir)
    samples = []
    if args.num_samples > 0:  # on every process: each forward of a sharded (FSDP) model gathers it from all of them
        samples = sample_generations(trainer.model, run.tokenizer, [""] * args.num_samples,
                                     args.sample_max_new_tokens, training_args.seed)
        reshard(trainer.model)
    if training_args.process_index == 0:
        hyperparameters = training_arguments_summary(training_args)
        write_training_summary(output_dir, {
            **run.summary,
            "training_tokens": trainer.state.global_step * hyperparameters["global_batch_size"] * run.block_size,
            "resumed_from": run.resume_checkpoint and Path(run.resume_checkpoint).name,
            "hyperparameters": hyperparameters,
            "speed": trainer.speed_summary(train_output.metrics.get("train_runtime")),
            "final_metrics": {key: value for key, value in metrics.items() if isinstance(value, (int, float))},
        })
        _report(metrics)
        if samples:
            print("\nSample generations (top-k 50, temperature 0.8):")
            for text in samples:
                print("  ---\n  " + text.strip().replace("\n", "\n  "))
        finish_model_dir(output_dir, push_to_hub=training_args.push_to_hub, hub_model_id=training_args.hub_model_id,
                         hub_token=training_args.hub_token, hub_private_repo=training_args.hub_private_repo)
        shutil.rmtree(_shared_tokenizer_dir(training_args), ignore_errors=True)
        print(f"\nSaved the model to {output_dir} (load it with AutoModelForCausalLM.from_pretrained('{output_dir}')).")
    return metrics


def run_pretraining(args: PretrainArguments, training_args: PretrainingArguments, callbacks: Sequence = ()) -> dict:
    """`prepare_pretraining` then `train_and_save`."""
    return train_and_save(prepare_pretraining(args, training_args, callbacks))


def _report(metrics: dict) -> None:
    lines = [f"training loss {metrics['train_loss']:.4f} after {metrics['global_step']} steps"]
    if "eval_loss" in metrics:
        lines.append(f"validation loss {metrics['eval_loss']:.4f} nats/token, perplexity "
                     f"{metrics.get('eval_perplexity', perplexity(metrics['eval_loss'])):.2f}")
    lines.append(f"wall time {metrics['wall_time_seconds']:.0f} s")
    print("\n" + "; ".join(lines))


def parse_args(argv: Sequence[str] | None = None) -> tuple[PretrainArguments, PretrainingArguments]:
    parser = HfArgumentParser((PretrainArguments, PretrainingArguments),
                              prog="hfgpt pretrain", description=__doc__.split("\n\n")[0])
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):  # all arguments from a file
        loader = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        return scale_down("hfgpt pretrain", *loader(argv[0]))
    return scale_down("hfgpt pretrain", *parser.parse_args_into_dataclasses(argv))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run = prepare_pretraining(*parse_args(argv))
    except (DataError, FileNotFoundError, ValueError) as error:  # bad input: a message, not a traceback
        print(f"hfgpt pretrain: error: {error}", file=sys.stderr)
        return 1
    try:
        train_and_save(run)
    except KeyboardInterrupt:  # Ctrl-C: where to resume from, not a traceback
        return report_interrupted("hfgpt pretrain", run.training_args.output_dir, argv)
    end_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

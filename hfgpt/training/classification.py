"""Fine-tune an hfgpt model to classify sequences (`hfgpt classify`, `python train/classify.py`).

    hfgpt classify --model_name_or_path out/pretrain --train_file sms_spam.tsv --output_dir out/spam
    hfgpt classify ... --lora                  # LoRA adapters + the head; the merged model lands in --output_dir
    hfgpt classify ... --qlora                 # the same on a 4-bit NF4 base (bitsandbytes)
    hfgpt classify ... --train_last_n_blocks 2 # freeze all but the last 2 blocks, the final norm and the head
    hfgpt classify ... --lm_loss_weight 0.5    # + 0.5 x the next-token loss on the same texts (GPT-1's auxiliary loss)

The starting point is any hfgpt directory (a pretrained causal LM, or a classifier to fine-tune further): its blocks
are loaded into `HFGPTForSequenceClassification`, whose head (`score`) reads the hidden state of each sequence's last
real token. Batches are padded per batch (`DataCollatorWithPadding`) and grouped by length. Accuracy, precision,
recall and F1 are computed on the validation split at every evaluation (each epoch by default). The output directory
is a complete model directory (weights, config with the label names, code, tokenizer, card) plus
training_summary.json (with the run report: parameters, memory, peak RSS), eval_results.json (with the confusion
matrix), the loss curve and the log history.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import SequentialSampler
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    HfArgumentParser,
    IntervalStrategy,
    SchedulerType,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .. import files
from ..docs_smoke import scale_down
from ..data.labels import LABEL_ID_COLUMN, label_mappings, load_labelled_datasets
from ..data.sources import TRAIN_SPLIT, VALIDATION_SPLIT, DataError, split_file_list
from ..data.text import set_text_start_bos
from .common import (
    MatrixWeightDecayMixin,
    ResumeMixin,
    check_mixed_precision,
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
from .speed import SpeedArguments, SpeedMixin, uncompile
from .peft import PeftArguments, add_lora, linear_memory_footprint, load_base_model, run_report, save_adapter_and_merge

logger = logging.getLogger(__name__)

TASK = "sequence classification"
CLASS_WEIGHT_MODES = ("balanced",)


@dataclass
class ClassificationArguments:
    """The model to start from, the labelled data, and what to train. (Hyper-parameters: `TrainingArguments`.)"""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The hfgpt model to fine-tune: a directory (e.g. the output of hfgpt "
                                        "pretrain) or a Hub id. Required."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer directory or Hub id. Default: the one saved with the model."})
    train_file: list[str] | None = field(
        default=None, metadata={"help": "Labelled rows: .csv, .tsv, .jsonl or .json files (globs allowed); repeat the "
                                        "flag or separate paths with commas.", "action": "extend"})
    validation_file: list[str] | None = field(
        default=None, metadata={"help": "Validation rows (same formats). Default: the dataset's validation split, "
                                        "or the last --validation_split_percentage percent of the training rows.",
                                "action": "extend"})
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset id or a directory written by save_to_disk (instead of files)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    text_column: str = field(default="text", metadata={"help": "The column holding the text to classify."})
    label_column: str = field(default="label", metadata={"help": "The column holding the label (a name or an id)."})
    class_names: list[str] | None = field(
        default=None, metadata={"help": "The classes (label values) in id order, space- or comma-separated (e.g. 'ham,spam' makes "
                                        "spam class 1, the positive class of the binary F1). Default: the sorted "
                                        "label values of the training data."})
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Percentage of the training rows held out for validation when there is no "
                                        "validation file or split (0: no validation)."})
    max_length: int | None = field(
        default=None, metadata={"help": "Truncate texts to this many tokens (default: the model's context length)."})
    train_last_n_blocks: int | None = field(
        default=None, metadata={"help": "Train only the last N blocks, the final norm and the head; everything else "
                                        "stays frozen. Default: train everything (or, with --lora, the adapters)."})
    classifier_pooling: str | None = field(
        default=None, metadata={"help": "What the head reads: 'last' (the last real token's hidden state) or 'mean' "
                                        "(the average over the real tokens). Default: the model config's "
                                        "classifier_pooling ('last' unless set)."})
    add_bos_token: bool = field(
        default=True, metadata={"help": "Start every text with the tokenizer's BOS token, as hfgpt's pretraining starts "
                                        "every document (with <|endoftext|>). The tokenizer saved with the classifier "
                                        "keeps doing it, so pipelines and hfgpt eval classification encode texts as "
                                        "training did. false: texts as they are."})
    class_weights: str | None = field(
        default=None, metadata={"help": "Weight the loss per class for imbalanced data: 'balanced' (n_rows / "
                                        "(n_classes * rows of the class), as scikit-learn) or one weight per class "
                                        "in id order, e.g. '1,6.5'."})
    lm_loss_weight: float = field(
        default=0.0, metadata={"help": "Add this times the language-modelling loss on the training texts to the "
                                       "classification loss while training, the auxiliary objective of GPT-1 "
                                       "(Radford et al., 2018, used 0.5). The model predicts next tokens with its "
                                       "(tied) input embeddings, so it needs tie_word_embeddings. 0: off."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a model or checkpoints already in --output_dir."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code for non-hfgpt models."})

    def __post_init__(self):
        self.train_file = split_file_list(self.train_file) or None
        self.validation_file = split_file_list(self.validation_file) or None
        if self.class_names is not None:  # (TrainingArguments.label_names is something else: the batch's label keys)
            self.class_names = [name.strip() for item in self.class_names for name in str(item).split(",")
                                if name.strip()] or None
        if self.train_last_n_blocks is not None and self.train_last_n_blocks < 1:
            raise ValueError(f"--train_last_n_blocks must be at least 1, got {self.train_last_n_blocks}.")
        if self.lm_loss_weight < 0:
            raise ValueError(f"--lm_loss_weight must be 0 (off) or positive, got {self.lm_loss_weight}.")


@dataclass
class ClassificationTrainingArguments(SpeedArguments, TrainingArguments):
    """`TrainingArguments` with defaults for fine-tuning a classifier: evaluate and checkpoint every epoch (two
    checkpoints kept), batches of similar lengths (less padding), TensorBoard logs."""

    output_dir: str | None = field(default="out/classify", metadata={"help": "Where the model and logs go."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (LoRA: try 1e-3)."})
    lr_scheduler_type: SchedulerType | str = field(default="linear", metadata={"help": "Schedule after warmup."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Warmup steps (int), or a fraction of the run (<1)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay, on weight matrices only."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Rows per device per step."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Rows per device per eval step."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs over the training rows."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps (or a fraction of the run)."})
    eval_strategy: IntervalStrategy | str = field(default="epoch", metadata={"help": "When to evaluate: no, steps, "
                                                                                     "epoch."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint: no, steps, epoch, best."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (older ones are deleted)."})
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "Sampler: 'group_by_length' (default: random batches of similar lengths, less padding), "
                          "'random', 'sequential', 'batch_rebalance'.",
                  "choices": ["random", "sequential", "group_by_length", "batch_rebalance"]})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "Loggers: tensorboard, none..."})
    # pinned memory only speeds up copies to a GPU; on a CPU, torch warns about it at every dataloader
    dataloader_pin_memory: bool = field(
        default=torch.cuda.is_available(), metadata={"help": "Pin batches in memory (helps only with a GPU)."})


# --- what to train ----------------------------------------------------------------------------------------------------


def freeze_all_but_last_blocks(model: nn.Module, num_blocks: int) -> None:
    """Leave trainable only the last `num_blocks` blocks, the final norm and the head of an
    `HFGPTForSequenceClassification`: the early blocks keep their pretrained features, and a step costs less."""
    blocks = model.transformer.h
    if not 1 <= num_blocks <= len(blocks):
        raise ValueError(f"--train_last_n_blocks {num_blocks}: the model has {len(blocks)} blocks; choose 1 to "
                         f"{len(blocks)} (or leave it unset to train everything).")
    model.requires_grad_(False)
    for module in (*blocks[len(blocks) - num_blocks:], model.transformer.ln_f, model.score):
        module.requires_grad_(True)


# --- loss and metrics -------------------------------------------------------------------------------------------------


def class_weights_from(spec: str, train_labels: Sequence[int], label_names: Sequence[str]) -> torch.Tensor:
    """`--class_weights` -> one weight per class: 'balanced' from the training labels, or the listed numbers."""
    num_classes = len(label_names)
    if spec.strip().lower() == "balanced":
        counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=num_classes)
        if (counts == 0).any():
            absent = [label_names[i] for i in np.flatnonzero(counts == 0)]
            raise DataError(f"--class_weights balanced: the training data has no rows of class(es) {absent}; "
                            "give explicit weights, or add rows of every class.")
        return torch.tensor(counts.sum() / (num_classes * counts), dtype=torch.float32)
    try:
        weights = [float(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(f"--class_weights {spec!r}: use 'balanced' or one number per class, comma-separated "
                         f"(classes in id order: {', '.join(label_names)}).") from None
    if len(weights) != num_classes or any(weight <= 0 for weight in weights):
        raise ValueError(f"--class_weights {spec!r}: need {num_classes} positive numbers, one per class in id order "
                         f"({', '.join(label_names)}).")
    return torch.tensor(weights, dtype=torch.float32)


class WeightedCrossEntropy:
    """Class-weighted cross-entropy for Trainer's `compute_loss_func`: summed over the rows, divided by the rows of
    the whole (accumulated) batch, so gradient accumulation gives the same update as one large batch."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights

    def __call__(self, outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        labels = labels.to(logits.device)
        loss = nn.functional.cross_entropy(logits.float(), labels, weight=self.weights.to(logits.device),
                                           reduction="sum")
        return loss / (num_items_in_batch if num_items_in_batch is not None else labels.numel())


def classification_metrics(predictions, references, num_labels: int, full: bool = False) -> dict:
    """Accuracy, precision, recall and F1 (binary F1 of class 1 for two classes, macro-averaged otherwise), computed
    by hfgpt.evaluation; with `full`, also the confusion matrix and the averaging used."""
    from ..evaluation.classification import compute_classification

    results = compute_classification(predictions, references, labels=list(range(num_labels)),
                                     average="binary" if num_labels == 2 else "macro", zero_division=0.0)
    if full:
        return results
    return {key: results[key] for key in ("accuracy", "precision", "recall", "f1")}


def metrics_function(num_labels: int):
    """`compute_metrics` for Trainer: argmax of the logits against the labels."""

    def compute_metrics(eval_prediction) -> dict:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        return classification_metrics(np.asarray(logits).argmax(-1), eval_prediction.label_ids, num_labels)

    return compute_metrics


def language_modelling_loss(model: nn.Module, hidden_states: torch.Tensor, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The causal LM's loss (the same transformers loss `HFGPTForCausalLM` uses) over the real tokens, the logits
    from the final hidden states and the input embeddings (the causal LM's tied output layer, which the classifier
    keeps)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    embeddings = model.get_input_embeddings().weight
    labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    return ForCausalLMLoss(hidden_states @ embeddings.T, labels, vocab_size=embeddings.shape[0])


class ClassificationTrainer(SpeedMixin, ResumeMixin, MatrixWeightDecayMixin, Trainer):
    """Trainer with weight decay on weight matrices only, evaluating in dataset order, and (with `lm_loss_weight`)
    the language-modelling loss added to the classification loss in training steps."""

    def __init__(self, *args, lm_loss_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.lm_loss_weight = lm_loss_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self.lm_loss_weight and model.training):  # evaluation reports the classification loss alone
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, {**inputs, "output_hidden_states": True}, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        lm_loss = language_modelling_loss(self.accelerator.unwrap_model(model), outputs.hidden_states[-1],
                                          inputs["input_ids"], inputs.get("attention_mask"))
        if num_items_in_batch is not None:
            # the classification loss is then already divided over the whole accumulated batch and Trainer does not
            # divide by the accumulation steps; the LM loss is this micro-batch's mean, so divide it here
            lm_loss = lm_loss / self.current_gradient_accumulation_steps
        loss = loss + self.lm_loss_weight * lm_loss
        return (loss, outputs) if return_outputs else loss

    def _get_eval_sampler(self, eval_dataset):
        # transformers length-groups (and so shuffles) evaluation batches too under group_by_length; grouping only
        # saves padding, and in order the predictions line up with the validation rows (predictions.jsonl)
        if eval_dataset is None or self.args.world_size > 1:  # several processes: accelerate shards in order
            return None
        return SequentialSampler(eval_dataset)


# --- the run ----------------------------------------------------------------------------------------------------------


def load_tokenizer(args: ClassificationArguments):
    from ..evaluation.cli import ensure_pad_token
    from ..evaluation.loading import load_tokenizer as load

    tokenizer = load(args.tokenizer_name_or_path or args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    set_text_start_bos(tokenizer, args.add_bos_token)
    return tokenizer


def tokenize(datasets, tokenizer, text_column: str, max_length: int):
    """Token ids (truncated to `max_length`) and the class id of every row; padding waits for the collator."""

    def encode(batch):
        return tokenizer(batch[text_column], truncation=True, max_length=max_length)

    return datasets.map(encode, batched=True, remove_columns=[text_column], desc="Tokenizing")


def _model_config(args: ClassificationArguments):
    path = Path(args.model_name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (it has no config.json). Pass the output directory "
                                "of a training run (e.g. hfgpt pretrain), or a Hub model id.")
    return AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)


def _data_description(args: ClassificationArguments) -> dict:
    """The data, as the training summary (and so the model card) records it; the same keys as hfgpt pretrain."""
    return {"dataset_name": args.dataset_name, "dataset_config_name": args.dataset_config_name,
            "train_files": args.train_file, "validation_files": args.validation_file,
            **training_data_record(args.train_file)}


@dataclass
class ClassificationRun:
    """Everything `prepare_classification` set up, ready for `train_and_save`."""

    args: ClassificationArguments
    training_args: ClassificationTrainingArguments
    peft_args: PeftArguments
    trainer: ClassificationTrainer
    tokenizer: Any
    label_names: list[str]
    resume_checkpoint: str | None
    summary: dict
    memory: dict
    started: float
    validation_texts: list[str] | None = None  # for predictions.jsonl, in the order of the eval dataset


def prepare_classification(args: ClassificationArguments, training_args: ClassificationTrainingArguments,
                           peft_args: PeftArguments | None = None, callbacks: Sequence = ()) -> ClassificationRun:
    """Check the input, load the data, tokenizer and model, build the Trainer. Bad input fails here, before any
    training (DataError, FileNotFoundError, ValueError)."""
    started = time.time()
    peft_args = peft_args or PeftArguments()
    if not args.model_name_or_path:
        raise ValueError("--model_name_or_path is required: the hfgpt model to fine-tune (e.g. the output directory "
                         "of hfgpt pretrain).")
    if peft_args.lora and args.train_last_n_blocks:
        raise ValueError("--train_last_n_blocks and --lora/--qlora are two different ways to choose what trains; "
                         "pick one.")
    if training_args.push_to_hub and peft_args.lora and not peft_args.merge_adapter:
        raise ValueError("--push_to_hub publishes a model directory; with --merge_adapter false there is none (only "
                         "the adapter). Keep the merge, or push the adapter yourself.")
    check_mixed_precision(training_args)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    resume_checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, output_dir)
    base_config = _model_config(args)
    if args.lm_loss_weight and not base_config.tie_word_embeddings:
        raise ValueError("--lm_loss_weight needs a model with tied embeddings (its output layer is the input "
                         f"embeddings, which the classifier keeps); {args.model_name_or_path} has "
                         "tie_word_embeddings=false. Leave --lm_loss_weight at 0.")

    raw, label_names = load_labelled_datasets(
        train_files=args.train_file, validation_files=args.validation_file, dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name, text_column=args.text_column, label_column=args.label_column,
        validation_split_percentage=args.validation_split_percentage, label_names=args.class_names,
    )
    tokenizer = load_tokenizer(args)
    context = base_config.max_position_embeddings
    max_length = args.max_length or context
    if max_length > context:
        raise ValueError(f"--max_length {max_length} is longer than the model's context ({context} tokens).")
    id2label, label2id = label_mappings(label_names)
    model_kwargs = dict(num_labels=len(label_names), id2label=id2label, label2id=label2id,
                        pad_token_id=tokenizer.pad_token_id, trust_remote_code=args.trust_remote_code)
    if args.classifier_pooling:
        model_kwargs["classifier_pooling"] = args.classifier_pooling
    # the labels decide the head's shape: compare against what is in --output_dir before loading anything big
    target_config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code,
                                               **{k: v for k, v in model_kwargs.items() if k != "trust_remote_code"})
    target_config.architectures = ["HFGPTForSequenceClassification"]
    for name in ("bos_token_id", "eos_token_id"):  # Trainer copies the tokenizer's into the config (what was saved)
        if getattr(tokenizer, name, None) is not None:
            setattr(target_config, name, getattr(tokenizer, name))
    if training_args.process_index == 0:
        check_output_dir(output_dir, target_config, resume_checkpoint, args.overwrite_output_dir)

    with training_args.main_process_first(desc="tokenizing"):
        encoded = tokenize(raw, tokenizer, args.text_column, max_length)
    has_validation = VALIDATION_SPLIT in encoded
    if not has_validation and training_args.eval_strategy != IntervalStrategy.NO:
        logger.warning("No validation split (--validation_split_percentage 0 and no validation file): not evaluating.")
        training_args.eval_strategy = IntervalStrategy.NO

    model = load_base_model(args.model_name_or_path, AutoModelForSequenceClassification, peft_args,
                            gradient_checkpointing=bool(training_args.activation_checkpointing), **model_kwargs)
    memory = linear_memory_footprint(model)
    if peft_args.lora:
        model = add_lora(model, peft_args, task_type="SEQ_CLS")
    elif args.train_last_n_blocks:
        freeze_all_but_last_blocks(model, args.train_last_n_blocks)

    compute_loss_func = None
    if args.class_weights:
        weights = class_weights_from(args.class_weights, encoded[TRAIN_SPLIT][LABEL_ID_COLUMN], label_names)
        compute_loss_func = WeightedCrossEntropy(weights)
        logger.info("Class weights: %s", dict(zip(label_names, weights.tolist())))

    push_to_hub = training_args.push_to_hub
    training_args.push_to_hub = False  # hfgpt's finish_model_dir pushes, with hfgpt's card, after saving
    trainer = ClassificationTrainer(
        model=model,
        args=training_args,
        train_dataset=encoded[TRAIN_SPLIT],
        eval_dataset=encoded[VALIDATION_SPLIT] if has_validation else None,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=metrics_function(len(label_names)),
        compute_loss_func=compute_loss_func,
        callbacks=[*training_callbacks(f"hfgpt classification: {output_dir.name}", loss_per="example"), *callbacks],
        lm_loss_weight=args.lm_loss_weight,
    )
    training_args.push_to_hub = push_to_hub
    summary = {
        "task": TASK,
        "base_model": args.model_name_or_path,
        **{key: value for key, value in _data_description(args).items() if value},
        "text_column": args.text_column,
        "label_column": args.label_column,
        "labels": ", ".join(label_names),
        "training_rows": len(encoded[TRAIN_SPLIT]),
        "validation_rows": len(encoded[VALIDATION_SPLIT]) if has_validation else None,
        "max_length": max_length,
        "train_last_n_blocks": args.train_last_n_blocks,
        "class_weights": args.class_weights,
        "lm_loss_weight": args.lm_loss_weight,
        "add_bos_token": args.add_bos_token,
    }
    validation_texts = raw[VALIDATION_SPLIT][args.text_column] if has_validation else None
    return ClassificationRun(args, training_args, peft_args, trainer, tokenizer, label_names, resume_checkpoint,
                             summary, memory, started, validation_texts)


def _save_model(run: ClassificationRun, output_dir: Path) -> None:
    from peft import PeftModel

    model = run.trainer.accelerator.unwrap_model(run.trainer.model)
    if isinstance(model, PeftModel):
        save_adapter_and_merge(model, output_dir, run.tokenizer, merge=run.peft_args.merge_adapter)
    else:
        save_final_model(run.trainer, output_dir)


def _evaluation_results(run: ClassificationRun, predictions, references) -> dict:
    """eval_results.json's "classification" entry (the format of `hfgpt eval classification`)."""
    results = classification_metrics(predictions, references, len(run.label_names), full=True)
    results.update(label_names=run.label_names, num_examples=len(references),
                   dataset={"name": _validation_name(run.args), "split": VALIDATION_SPLIT})
    return results


def prediction_rows(texts: Sequence[str], logits: np.ndarray, references: np.ndarray, label_names: Sequence[str]):
    """predictions.jsonl's rows: each validation text with its label, the predicted label and every class's
    probability, so the misclassified texts are one filter away."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    probabilities = logits.softmax(-1).tolist()
    return [{"text": text, "label": label_names[int(reference)], "prediction": label_names[int(predicted)],
             "correct": int(reference) == int(predicted),
             "probabilities": {name: round(p, 6) for name, p in zip(label_names, row)}}
            for text, reference, predicted, row in zip(texts, references, logits.argmax(-1).tolist(), probabilities)]


@torch.no_grad()
def _predict_saved_model(run: ClassificationRun, output_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Logits of the model saved in `output_dir` on the validation split, and the labels."""
    model = AutoModelForSequenceClassification.from_pretrained(output_dir).to(run.training_args.device).eval()
    logits, references = [], []
    for batch in run.trainer.get_eval_dataloader():
        batch = {key: value.to(model.device) for key, value in batch.items()}
        references.append(batch.pop("labels").cpu())
        logits.append(model(**batch).logits.float().cpu())
    return torch.cat(logits).numpy(), torch.cat(references).numpy()


def train_and_save(run: ClassificationRun) -> dict:
    """Train (resuming if asked), evaluate with the confusion matrix, save the model directory, the summary and the
    card. Returns the final metrics."""
    from ..hub import finish_model_dir

    trainer, training_args, peft_args = run.trainer, run.training_args, run.peft_args
    output_dir = Path(training_args.output_dir)
    train_output = trainer.train(resume_from_checkpoint=run.resume_checkpoint)
    uncompile(trainer.model)  # the predictions below come in other shapes than the training batches
    metrics = {"train_loss": train_output.training_loss, "global_step": train_output.global_step,
               **{key: value for key, value in train_output.metrics.items() if key != "train_loss"}}
    evaluation = None
    if trainer.eval_dataset is not None:
        prediction = trainer.predict(trainer.eval_dataset, metric_key_prefix="eval")
        trainer.log(prediction.metrics)
        metrics.update(prediction.metrics)
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        references = prediction.label_ids
        evaluation = _evaluation_results(run, logits.argmax(-1), references)
    metrics["wall_time_seconds"] = round(time.time() - run.started, 1)

    _save_model(run, output_dir)
    if training_args.process_index == 0:
        if evaluation is not None and peft_args.qlora and peft_args.merge_adapter:
            # The merged float32 model is not the 4-bit one just evaluated (NF4 rounding): score what was saved.
            logits, references = _predict_saved_model(run, output_dir)
            evaluation = _evaluation_results(run, logits.argmax(-1), references)
            metrics.update({f"merged_{key}": evaluation[key] for key in ("accuracy", "precision", "recall", "f1")})
        report = run_report(trainer.model, run.memory, peft_args)
        write_training_summary(output_dir, {
            **{key: value for key, value in run.summary.items() if value is not None},
            "resumed_from": run.resume_checkpoint and Path(run.resume_checkpoint).name,
            **report,
            "hyperparameters": training_arguments_summary(training_args),
            "speed": trainer.speed_summary(train_output.metrics.get("train_runtime")),
            "final_metrics": {key: value for key, value in metrics.items() if isinstance(value, (int, float))},
        })
        if evaluation is not None:
            files.update_eval_results(output_dir, "classification", evaluation)
            files.write_jsonl(output_dir / files.PREDICTIONS,
                              prediction_rows(run.validation_texts, logits, references, run.label_names))
        _print_report(metrics, report, output_dir)
        if (output_dir / "config.json").is_file():  # not with --lora --merge_adapter false: no model to describe
            finish_model_dir(output_dir, push_to_hub=training_args.push_to_hub,
                             hub_model_id=training_args.hub_model_id, hub_token=training_args.hub_token,
                             hub_private_repo=training_args.hub_private_repo)
    return metrics


def _validation_name(args: ClassificationArguments) -> str:
    if args.validation_file:
        return ", ".join(Path(path).name for path in args.validation_file)
    source = args.dataset_name or ", ".join(Path(path).name for path in args.train_file)
    return f"{source} (held-out {args.validation_split_percentage:g}%)" if not args.dataset_name else source


def _print_report(metrics: dict, report: dict, output_dir: Path) -> None:
    parameters, memory = report["parameters"], report["memory"]
    lines = [f"training loss {metrics['train_loss']:.4f} after {metrics['global_step']} steps "
             f"({metrics['wall_time_seconds']:.0f} s)"]
    for prefix, what in (("eval_", "validation"), ("merged_", "validation, merged float32 model")):
        if f"{prefix}accuracy" in metrics:
            lines.append(f"{what}: accuracy {metrics[prefix + 'accuracy']:.4f}, precision "
                         f"{metrics[prefix + 'precision']:.4f}, recall {metrics[prefix + 'recall']:.4f}, "
                         f"F1 {metrics[prefix + 'f1']:.4f}")
    lines.append(f"{report['method']}: {parameters['trainable']:,} of {parameters['total']:,} parameters trained "
                 f"({parameters['trainable_percent']:.2f}%); block linear layers {memory['linear_bytes'] / 2**20:.2f} "
                 f"MiB ({memory['linear_ratio_to_fp32']:.0%} of float32); peak RSS "
                 f"{(memory['peak_rss_bytes'] or 0) / 2**20:.0f} MiB")
    print("\n" + "\n".join(lines))
    adapter = output_dir / files.ADAPTER_DIR
    if (output_dir / "config.json").is_file():
        print(f"Saved the classifier to {output_dir} (AutoModelForSequenceClassification.from_pretrained("
              f"'{output_dir}'){'; the adapter is in ' + str(adapter) if adapter.is_dir() else ''}).")
    else:
        print(f"Saved the adapter to {adapter} (AutoPeftModelForSequenceClassification.from_pretrained('{adapter}'), "
              "with its label names, or hfgpt.training.peft.merge_adapter).")


def run_classification(args: ClassificationArguments, training_args: ClassificationTrainingArguments,
                       peft_args: PeftArguments | None = None, callbacks: Sequence = ()) -> dict:
    """`prepare_classification` then `train_and_save`."""
    return train_and_save(prepare_classification(args, training_args, peft_args, callbacks))


def parse_args(argv: Sequence[str] | None = None):
    parser = HfArgumentParser((ClassificationArguments, PeftArguments, ClassificationTrainingArguments),
                              prog="hfgpt classify", description=__doc__.split("\n\n")[0])
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):  # all arguments from a file
        loader = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        args, peft_args, training_args = loader(argv[0])
    else:
        args, peft_args, training_args = parser.parse_args_into_dataclasses(argv)
    return scale_down("hfgpt classify", args, training_args, peft_args)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run = prepare_classification(*parse_args(argv))
    except (DataError, FileNotFoundError, ValueError) as error:  # bad input: a message, not a traceback
        print(f"hfgpt classify: error: {error}", file=sys.stderr)
        return 1
    try:
        train_and_save(run)
    except KeyboardInterrupt:  # Ctrl-C: where to resume from, not a traceback
        return report_interrupted("hfgpt classify", run.training_args.output_dir, argv)
    end_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Model cards: a README.md for a model directory, written from what the directory holds.

`write_model_card(model_dir)` reads config.json, the safetensors headers (parameter count, without loading weights),
the tokenizer, training_summary.json, loss_curve.png and eval_results.json (names from `hfgpt.files`), and fills the
template hfgpt/templates/model_card.md (package data, so an installed hfgpt finds it). The eval results appear twice:
as a table and as `model-index` metadata built with huggingface_hub's `ModelCardData` / `EvalResult`, which is what
the Hub reads. Whatever the directory lacks is left out of the card; nothing is filled in by guesswork.

`hfgpt card DIR` is the command-line entry point.
"""

import argparse
import os
from importlib import resources
from pathlib import Path

from . import files
from .docs_smoke import scale_down

TEMPLATE = "model_card.md"
GENERATED_MARKER = "Written by hfgpt.cards.write_model_card"

# eval_results.json section -> (task type, task name, the keys that are metrics). Other keys are bookkeeping.
_EVAL_SECTIONS = {
    "perplexity": ("text-generation", "Text Generation", ("perplexity",)),
    "rouge": ("text-generation", "Text Generation", ("rouge1", "rouge2", "rougeL", "rougeLsum")),
    "classification": ("text-classification", "Text Classification", ("accuracy", "precision", "recall", "f1")),
}
_METRIC_NAMES = {"perplexity": "Perplexity", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
                 "rougeLsum": "ROUGE-Lsum", "accuracy": "Accuracy", "precision": "Precision", "recall": "Recall",
                 "f1": "F1"}
_TASKS = {"text-generation": "Text Generation", "text-classification": "Text Classification"}
# training_summary.json tasks that teach a model to answer in its chat template (hfgpt.training.alignment's SFT_TASK,
# DPO_TASK): only those models are tagged `conversational` and shown with a chat example
CHAT_TASKS = ("instruction tuning (SFT)", "preference tuning (DPO)")


def count_parameters(model_dir: str | os.PathLike) -> int | None:
    """Parameters stored in the directory's safetensors files (tied weights are stored once), read from the file
    headers only. None when there are no safetensors weights."""
    from safetensors import safe_open
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    model_dir = Path(model_dir)
    index = files.read_json(model_dir / SAFE_WEIGHTS_INDEX_NAME)
    shards = sorted(set(index["weight_map"].values())) if index else [SAFE_WEIGHTS_NAME]
    if not all((model_dir / shard).is_file() for shard in shards):
        return None
    total = 0
    for shard in shards:
        with safe_open(model_dir / shard, framework="pt") as handle:
            for key in handle.keys():
                count = 1
                for size in handle.get_slice(key).get_shape():
                    count *= size
                total += count
    return total


def human_count(count: int) -> str:
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= divisor:
            return f"{count / divisor:.3g}{suffix}"
    return str(count)


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(item) for item in value)
    if isinstance(value, dict):
        return ", ".join(f"{key}={_format(item)}" for key, item in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def _architecture_rows(config: dict, num_parameters: int | None) -> list[tuple[str, str]]:
    rows = []

    def add(name, value):
        if value is not None:
            rows.append((name, _format(value)))

    add("architecture", ", ".join(config.get("architectures") or []) or config.get("model_type"))
    if num_parameters is not None:
        add("parameters", f"{human_count(num_parameters)} ({num_parameters:,})")
    add("layers", config.get("num_hidden_layers"))
    add("hidden size", config.get("hidden_size"))
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads is not None:
        if kv_heads is None or kv_heads == heads:
            add("attention", f"{heads} heads (multi-head)")
        else:
            kind = "multi-query" if kv_heads == 1 else "grouped-query"
            add("attention", f"{heads} query heads, {kv_heads} key/value heads ({kind})")
    if config.get("hidden_act") is not None:
        add("MLP", f"{config['hidden_act']}, intermediate size {config.get('intermediate_size')}")
    add("context length", config.get("max_position_embeddings"))
    position = config.get("position_embedding_type")
    if position == "rope":
        rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta")}  # older configs: rope_theta
        position = f"rope (theta {rope['rope_theta']})"
        if rope.get("rope_type", "default") != "default":
            position = f"rope (theta {rope['rope_theta']}, {rope['rope_type']} scaling x{rope.get('factor')})"
    add("position embeddings", position)
    if config.get("norm_type") is not None:
        add("normalisation", f"{config['norm_type']}, {config.get('norm_position', 'pre')}-norm")
    add("biases", config.get("bias"))
    add("tied input/output embeddings", config.get("tie_word_embeddings"))
    dropouts = {name: config[name] for name in ("embedding_dropout", "attention_dropout", "residual_dropout",
                                                 "classifier_dropout") if config.get(name)}
    if dropouts:
        add("dropout", dropouts)
    add("weights dtype", config.get("dtype") or config.get("torch_dtype"))
    if _is_classifier(config) and config.get("id2label"):
        labels = sorted(config["id2label"].items(), key=lambda item: int(item[0]))
        add("labels", [f"{index}: {name}" for index, name in labels])
    return rows


def _is_classifier(config: dict) -> bool:
    return any("SequenceClassification" in name for name in config.get("architectures") or [])


def _tokenizer_rows(model_dir: Path) -> tuple[list[tuple[str, str]], bool]:
    """Rows describing the saved tokenizer, and whether it has a chat template. No rows without a tokenizer."""
    if not any((model_dir / name).is_file() for name in files.TOKENIZER_FILES):
        return [], False
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    special = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
               if getattr(tokenizer, name, None) is not None}
    rows = [("type", type(tokenizer).__name__), ("vocabulary size", f"{len(tokenizer):,}")]
    if special:
        rows.append(("special tokens", ", ".join(f"{name.removesuffix('_token')} `{_format(token)}`"
                                                 for name, token in special.items())))
    rows.append(("chat template", "yes" if has_chat_template else "no"))
    return rows, has_chat_template


def _training_sections(summary: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    """training_summary.json as tables: its scalar entries first, then one table per nested dict."""
    summary = {key: value for key, value in summary.items() if key != files.TRAINING_DATA_FILES}
    scalars = [(key, _format(value)) for key, value in summary.items()
               if not isinstance(value, dict) and value is not None]
    sections = [("", scalars)] if scalars else []
    for key, value in summary.items():
        if isinstance(value, dict) and value:
            rows = [(name, _format(item)) for name, item in value.items() if item is not None]
            sections.append((key.replace("_", " ").capitalize(), rows))
    return sections


def _dataset_of(results: dict) -> dict | None:
    dataset = results.get("dataset")
    if isinstance(dataset, str):
        return {"name": dataset}
    return dataset if isinstance(dataset, dict) and dataset.get("name") else None


def _evaluation(eval_results: dict, default_task: str):
    """Table rows, huggingface_hub EvalResults and confusion matrices from eval_results.json."""
    from huggingface_hub import EvalResult

    rows, results, matrices = [], [], []
    for section, values in eval_results.items():
        if not isinstance(values, dict):
            continue
        task_type, task_name, metric_keys = _EVAL_SECTIONS.get(
            files.eval_section_name(section), (default_task, _TASKS.get(default_task, default_task), None))
        if metric_keys is None:  # a section hfgpt does not know: its float values are the metrics
            metric_keys = tuple(key for key, value in values.items() if isinstance(value, float))
        dataset = _dataset_of(values)
        # a score on the model's own training data is shown as such, and never published as a benchmark result
        on_training_data = bool(dataset and dataset.get("training_data"))
        # so is a score of the model with quantised weights (`--quantize int8`): not the published model's own
        quantization = values.get("quantization")
        shown_dataset = ((dataset["name"] + (" (training data)" if on_training_data else "")) if dataset else "—") + (
            f" ({quantization} weights)" if quantization else "")
        average = values.get("average")
        window = {key: values[key] for key in ("max_length", "stride") if key in values} or None
        for key in metric_keys:
            value = values.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # e.g. per-class lists with average=None: the table would mislead
            name, metric_args = _METRIC_NAMES.get(key, key), None
            if average and key in ("precision", "recall", "f1"):
                name, metric_args = f"{name} ({average})", {"average": average}
            elif key == "perplexity":
                metric_args = window
            rows.append({"task": task_name, "dataset": shown_dataset, "metric": name, "value": _format(float(value))})
            if dataset and not on_training_data and not quantization:
                results.append(EvalResult(
                    task_type=task_type, task_name=task_name, dataset_type=Path(dataset["name"]).stem,
                    dataset_name=dataset["name"], dataset_split=dataset.get("split"), metric_type=key,
                    metric_name=name, metric_value=float(value), metric_args=metric_args,
                ))
        if isinstance(values.get("confusion_matrix"), list):
            labels = values.get("label_names") or values.get("labels") or []
            if len(labels) == len(values["confusion_matrix"]):
                title = shown_dataset if dataset else section
                matrices.append((title, [str(label) for label in labels],
                                 list(zip(map(str, labels), values["confusion_matrix"]))))
    return rows, results, matrices


def build_model_card(model_dir: str | os.PathLike, model_id: str | None = None, model_name: str | None = None,
                     license: str | None = None, language: str | list[str] | None = None):
    """The `huggingface_hub.ModelCard` for `model_dir`. `model_id` (a Hub repo id) goes into the usage examples;
    default: the directory path."""
    import jinja2
    from huggingface_hub import ModelCard, ModelCardData
    from transformers.utils import CONFIG_NAME

    model_dir = Path(model_dir)
    config = files.read_json(model_dir / CONFIG_NAME)
    if config is None:
        raise FileNotFoundError(f"{model_dir} is not a model directory: it has no {CONFIG_NAME}.")
    model_name = model_name or (model_id.split("/")[-1] if model_id else model_dir.resolve().name)
    is_classifier = _is_classifier(config)
    pipeline_tag = "text-classification" if is_classifier else "text-generation"
    num_parameters = count_parameters(model_dir)
    tokenizer_rows, has_chat_template = _tokenizer_rows(model_dir)
    summary = files.read_json(model_dir / files.TRAINING_SUMMARY, default={}) or {}
    eval_rows, eval_results, matrices = _evaluation(files.read_json(model_dir / files.EVAL_RESULTS, default={}) or {},
                                                    pipeline_tag)

    # a base model's tokenizer has the chat template too (hfgpt's tokenizers always do): the training decides
    chat_trained = has_chat_template and not is_classifier and summary.get("task") in CHAT_TASKS
    base_model = summary.get("base_model")
    hub_datasets = [name for name in _as_list(summary.get("dataset_name")) if not Path(name).exists()]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["hfgpt", "custom_code"] + (["conversational"] if chat_trained else []),
        license=license,
        language=language,
        base_model=base_model if isinstance(base_model, str) and not Path(base_model).exists() else None,
        datasets=hub_datasets or None,
        eval_results=eval_results or None,
    )

    description = f"An hfgpt {'sequence classifier' if is_classifier else 'causal language model'}"
    if num_parameters is not None:
        description += f" with {human_count(num_parameters)} parameters"
    shape = [f"{config[key]} {label}" for key, label in (("num_hidden_layers", "layers"), ("hidden_size", "wide"))
             if config.get(key)]
    description += (f" ({', '.join(shape)})" if shape else "") + "."
    if summary.get("task"):
        description += f" Trained for {_format(summary['task'])}."

    template = resources.files("hfgpt").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined,
                                     keep_trailing_newline=True)
    content = environment.from_string(template).render(
        card_data=card_data.to_yaml(),
        model_name=model_name,
        model_id=model_id or str(model_dir),
        summary=description,
        architecture=_architecture_rows(config, num_parameters),
        tokenizer=tokenizer_rows,
        has_chat_template=has_chat_template,
        chat_trained=chat_trained,
        training=_training_sections(summary),
        loss_curve=files.LOSS_CURVE if (model_dir / files.LOSS_CURVE).is_file() else None,
        evaluation=eval_rows,
        confusion_matrices=matrices,
        is_classifier=is_classifier,
        num_labels=len(config.get("id2label") or {}),
        auto_class="AutoModelForSequenceClassification" if is_classifier else "AutoModelForCausalLM",
    )
    return ModelCard(content)


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [str(item) for item in value] if isinstance(value, (list, tuple)) else [str(value)]


def write_model_card(model_dir: str | os.PathLike, **kwargs) -> Path:
    """Write (or rewrite) <model_dir>/README.md from the directory's files; see `build_model_card` for the options."""
    path = Path(model_dir) / files.MODEL_CARD
    card = build_model_card(model_dir, **kwargs)
    tmp = path.with_name(path.name + ".tmp")  # atomic: a crash never leaves half a card
    tmp.write_text(str(card), encoding="utf-8")
    os.replace(tmp, path)
    return path


def is_generated_card(path: str | os.PathLike) -> bool:
    """Whether a README.md was written by `write_model_card` (and may be rewritten without losing edits)."""
    path = Path(path)
    return path.is_file() and GENERATED_MARKER in path.read_text(encoding="utf-8")


def argument_parser() -> argparse.ArgumentParser:
    """`hfgpt card`'s arguments (also what a recipe's card section takes)."""
    parser = argparse.ArgumentParser(prog="hfgpt card", description="Write the model card (README.md) of a model "
                                     "directory from its config, tokenizer, training summary and eval results.")
    parser.add_argument("model_dir")
    parser.add_argument("--model_id", help="Hub repo id to show in the usage examples (default: the directory).")
    parser.add_argument("--model_name", help="Name in the card title and model-index (default: the directory name).")
    parser.add_argument("--license", help="License identifier for the metadata, e.g. apache-2.0, mit.")
    parser.add_argument("--language", nargs="*", help="ISO 639 language code(s) of the training data, e.g. en.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = scale_down("hfgpt card", argument_parser().parse_args(argv))
    path = write_model_card(args.model_dir, model_id=args.model_id, model_name=args.model_name, license=args.license,
                            language=args.language or None)
    print(f"Wrote {path}")
    return 0


__all__ = ["build_model_card", "count_parameters", "is_generated_card", "write_model_card"]

if __name__ == "__main__":
    raise SystemExit(main())

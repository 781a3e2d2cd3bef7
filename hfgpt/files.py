"""The one place that knows the names and formats of the files hfgpt writes into a model directory.

A model directory (the output of every training script, the input of every eval script and of the model card) holds:

    config.json, model.safetensors, generation_config.json   transformers' own files
    configuration_hfgpt.py, modeling_hfgpt.py                the code for `trust_remote_code=True`
    tokenizer.json, tokenizer_config.json, chat_template.jinja  the tokenizer
    training_summary.json   what the training script did: task, data, hyper-parameters, final metrics, wall time
    log_history.json / log_history.csv   every logged step (loss, learning rate, eval loss)
    loss_curve.png          the training and validation loss against steps
    eval_results.json       {"perplexity": {...}, "rouge": {...}, "classification": {...}}, one key per eval script
    README.md               the model card
    generations.jsonl       SFT / DPO: answers to the held-out prompts, with their references
    preference_pairs.jsonl  DPO: each held-out preference pair with its implicit rewards
    predictions.jsonl       classification: each validation text with its label, prediction and class probabilities

It also reads the data files users hand to the scripts (`read_rows`: JSON lines, JSON, CSV, TSV).
"""

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterable

TRAINING_SUMMARY = "training_summary.json"
LOG_HISTORY_JSON = "log_history.json"
LOG_HISTORY_CSV = "log_history.csv"
LOSS_CURVE = "loss_curve.png"
EVAL_RESULTS = "eval_results.json"
MODEL_CARD = "README.md"
# SFT / DPO runs: the answers to the held-out prompts, one JSON object per line: {"prompt", "prediction", "reference"}.
GENERATIONS = "generations.jsonl"
# DPO runs: each held-out preference pair with its implicit rewards:
# {"prompt", "chosen", "rejected", "reward_chosen", "reward_rejected", "margin", "prefers_chosen"}.
PREFERENCE_PAIRS = "preference_pairs.jsonl"
# Classification runs: each validation row: {"text", "label", "prediction", "correct", "probabilities": {label: p}}.
PREDICTIONS = "predictions.jsonl"
# LoRA / QLoRA runs: the adapter (adapter_config.json, adapter_model.safetensors) lives in this subdirectory; the
# output directory itself holds the merged model.
ADAPTER_DIR = "adapter"
# A saved tokenizer has at least one of these (fast tokenizers: tokenizer.json; slow BPE: vocab.json; SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON atomically (temp file + rename), so a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """One JSON object per line, written atomically like `write_json`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    path = Path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


# the file suffixes read_rows reads as rows (JSON lines or a JSON list, CSV, TSV)
ROW_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def read_rows(path: str | os.PathLike, columns: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a JSON-lines, CSV or TSV file as dicts (a `.json` file may also hold a list of objects).

    Every name in `columns` must be present in every row; the error lists the columns that do exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in ROW_FILE_SUFFIXES:
        raise ValueError(
            f"Unsupported data file {path}: use .jsonl, .json, .csv or .tsv (or .txt where plain text is accepted)."
        )
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for line_number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{line_number} is not valid JSON: {error}") from None
    else:
        with path.open(encoding="utf-8", newline="") as handle:
            # TSV has no quoting: a text starting with '"' must not swallow the lines after it
            tsv = suffix == ".tsv"
            rows = list(csv.DictReader(handle, delimiter="\t" if tsv else ",",
                                       quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL))
    if not rows:
        raise ValueError(f"Data file {path} holds no rows.")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {index} is {type(row).__name__}, expected an object with named fields.")
        missing = [column for column in columns if column not in row]
        if missing:
            raise ValueError(
                f"{path}: row {index} has no column {', '.join(map(repr, missing))}; its columns are "
                f"{', '.join(map(repr, row))}. Pick the right ones with the --*_column arguments."
            )
    return rows


def update_eval_results(model_dir: str | os.PathLike, name: str, results: dict) -> Path:
    """Merge one eval script's results into <model_dir>/eval_results.json under `name`."""
    path = Path(model_dir) / EVAL_RESULTS
    all_results = read_json(path, default={})
    all_results[name] = results
    return write_json(path, all_results)

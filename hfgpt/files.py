"""The one place that knows the names and formats of the files hfgpt writes into a model directory.

A model directory (the output of every training script, the input of every eval script and of the model card) holds:

    config.json, model.safetensors, generation_config.json   transformers' own files
    configuration_hfgpt.py, modeling_hfgpt.py                the code for `trust_remote_code=True`
    tokenizer.json, tokenizer_config.json, chat_template.jinja  the tokenizer
    training_summary.json   what the training script did: task, data, hyper-parameters, final metrics, wall time
    log_history.json / log_history.csv   every logged step (loss, learning rate, eval loss)
    loss_curve.png          the training and validation loss against steps
    eval_results.json       {"perplexity": {...}, "classification": {...}, "classification@test.tsv": {...}}: one
                            entry per evaluation and dataset (`update_eval_results`), each with its "dataset"
    README.md               the model card
    generations.jsonl       SFT / DPO: answers to the held-out prompts, with their references
    preference_pairs.jsonl  DPO: each held-out preference pair with its implicit rewards
    predictions.jsonl       classification: each validation text with its label, prediction and class probabilities

It also reads the data files users hand to the scripts (`read_rows`: JSON lines, JSON, CSV, TSV).
"""

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

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


class DataFileError(ValueError):
    """A data file that cannot be read as rows: the message names the file, the line (1-based) and what is wrong."""


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataFileError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the file as "
                            "UTF-8.") from None


def _json_kind(value) -> str | None:
    if value is None:
        return None  # a missing value fits any column
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}.get(
        type(value), type(value).__name__)


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a JSON-lines, JSON, CSV or TSV file; `where` is "line N" (1-based; "item N" in a
    JSON list). A row that cannot be read, or whose field has another type than in the rows before it (which
    `datasets` cannot hold in one column), raises `DataFileError` naming the file, the line and the problem."""
    path = Path(path)
    suffix = path.suffix.lower()
    text = _read_text(path)
    if suffix in (".jsonl", ".json"):
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataFileError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}, column "
                                    f"{error.colno}).") from None
            located = ((f"item {number}", item) for number, item in enumerate(items, 1))
        else:
            located = _json_lines(path, text)
        kinds: dict[str, tuple[str, str]] = {}  # field -> (its type, where it was first seen)
        for where, row in located:
            if not isinstance(row, dict):
                raise DataFileError(f"{path}, {where}: a JSON {type(row).__name__} where an object with named fields "
                                    '(e.g. {"text": "..."}) is expected.')
            for key, value in row.items():
                kind = _json_kind(value)
                first = kinds.setdefault(key, (kind, where)) if kind else None
                if first and first[0] != kind:
                    raise DataFileError(f"{path}, {where}: field {key!r} is a {kind} here but a {first[0]} on "
                                        f"{first[1]}; every row must give a field the same type.")
            yield where, row
        return
    # TSV has no quoting: a text starting with '"' must not swallow the lines after it
    tsv = suffix == ".tsv"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    header = None
    try:
        for fields in reader:
            if not fields:
                continue  # a blank line
            if header is None:
                header = fields
                continue
            if len(fields) != len(header):
                hint = "a tab inside a text?" if tsv else "a comma inside an unquoted text? Quote the field"
                raise DataFileError(f"{path}, line {reader.line_num}: {len(fields)} fields where the header (the first "
                                    f"line) has {len(header)} ({hint}).")
            yield f"line {reader.line_num}", dict(zip(header, fields))
    except csv.Error as error:
        raise DataFileError(f"{path}, line {reader.line_num}: {error}.") from None


def _json_lines(path: Path, text: str) -> Iterator[tuple[str, object]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFileError(f"{path}, line {number}: not valid JSON ({error.msg}, column {error.colno}); each line "
                                "of a .jsonl file must be one JSON object.") from None


def check_data_file(path: str | os.PathLike) -> None:
    """Read a data file through, raising `DataFileError` at its first bad line (.txt files: only the encoding)."""
    path = Path(path)
    if path.suffix.lower() in ROW_FILE_SUFFIXES:
        for _ in iter_rows(path):
            pass
    else:
        _read_text(path)


def read_rows(path: str | os.PathLike, columns: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a JSON-lines, CSV or TSV file as dicts (a `.json` file may also hold a list of objects).

    Every name in `columns` must be present in every row; the error names the line and the columns that do exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    if path.suffix.lower() not in ROW_FILE_SUFFIXES:
        raise ValueError(
            f"Unsupported data file {path}: use .jsonl, .json, .csv or .tsv (or .txt where plain text is accepted)."
        )
    rows = []
    for where, row in iter_rows(path):
        missing = [column for column in columns if column not in row]
        if missing:
            raise DataFileError(
                f"{path}, {where}: row {len(rows) + 1} has no column {', '.join(map(repr, missing))}; its columns are "
                f"{', '.join(map(repr, row))}. Pick the right ones with the --*_column arguments."
            )
        rows.append(row)
    if not rows:
        raise ValueError(f"Data file {path} holds no rows.")
    return rows


def _dataset_identity(results: dict) -> tuple:
    """(dataset name, split, quantization) of a result: what makes two results comparable."""
    if not isinstance(results, dict):
        return None, None, None
    dataset, quantization = results.get("dataset"), results.get("quantization")
    if isinstance(dataset, dict):
        return dataset.get("name"), dataset.get("split"), quantization
    return dataset, None, quantization


def eval_results_key(all_results: dict, name: str, results: dict) -> str:
    """Where `results` go in eval_results.json: under `name` when that entry is free or holds the same dataset (and
    split, and quantization), else under `name@<dataset>[:<split>][+<quantization>]`. So a result on other data, or
    of the model with quantised weights, never replaces one: a training run's held-out score stays beside a score on
    any other file and beside the int8 model's score."""
    dataset, split, quantization = identity = _dataset_identity(results)
    existing = all_results.get(name)
    if existing is None or _dataset_identity(existing) == identity or (dataset is None and not quantization):
        return name
    return f"{name}@{dataset or ''}" + (f":{split}" if split else "") + (f"+{quantization}" if quantization else "")


def eval_section_name(key: str) -> str:
    """The evaluation an eval_results.json key belongs to: 'classification@test.tsv' -> 'classification'."""
    return key.split("@", 1)[0]


def update_eval_results(model_dir: str | os.PathLike, name: str, results: dict) -> Path:
    """Merge one evaluation's results into <model_dir>/eval_results.json (see `eval_results_key`)."""
    path = Path(model_dir) / EVAL_RESULTS
    all_results = read_json(path, default={})
    all_results[eval_results_key(all_results, name, results)] = results
    return write_json(path, all_results)


def fingerprint(path: str | os.PathLike) -> dict:
    """{"name", "bytes", "sha256"} of a data file: enough to recognise it again wherever it is copied, and nothing
    about where it lives on this machine (training_summary.json is published with the model)."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


# training_summary.json: the fingerprints of the files a run trained on (see `training_file_named`)
TRAINING_DATA_FILES = "training_data_files"


def training_file_named(model_dir: str | os.PathLike, path: str | os.PathLike) -> str | None:
    """The name of the training file of the run in `model_dir` that `path` is (same size and contents), or None.
    Runs that did not record their files (older ones, Hub datasets) give None."""
    summary = read_json(Path(model_dir) / TRAINING_SUMMARY, default={}) or {}
    recorded = summary.get(TRAINING_DATA_FILES) or []
    path = Path(path)
    if not recorded or not path.is_file():
        return None
    size = path.stat().st_size
    candidates = [entry for entry in recorded if isinstance(entry, dict) and entry.get("bytes") == size]
    if not candidates:  # no file of that size: no need to read it
        return None
    digest = fingerprint(path)["sha256"]
    return next((entry["name"] for entry in candidates if entry.get("sha256") == digest), None)

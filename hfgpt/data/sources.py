"""Where training rows come from: local files, a dataset saved with `save_to_disk`, or a dataset on the Hub.

`load_raw_datasets` turns any of them into a `DatasetDict` (or, with `streaming=True`, an `IterableDatasetDict`) with
a "train" split and, when there is one or one can be carved out, a "validation" split. Every training task (pretraining,
instruction tuning, preference tuning, classification) loads its rows through it and then formats them its own way.

File formats, chosen by extension:

    .txt / .text   plain text; one row per paragraph (blank-line separated) by default, see `sample_by`
    .jsonl / .json one JSON object per line (or a JSON list of objects)
    .csv / .tsv    a header row, then one row per line
"""

from __future__ import annotations

import contextlib
import csv
import glob
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from datasets import (
    Dataset,
    DatasetDict,
    IterableDataset,
    IterableDatasetDict,
    load_dataset,
    load_from_disk,
)

from .. import files

# extension -> the `datasets` builder that reads it (+ its keyword arguments)
FILE_BUILDERS: dict[str, tuple[str, dict]] = {
    ".txt": ("text", {}),
    ".text": ("text", {}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    # TSV has no quoting: a field may start with '"' (an SMS "quote") and must not swallow the lines after it
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
}
SAMPLE_BY = ("line", "paragraph", "document")
TRAIN_SPLIT, VALIDATION_SPLIT = "train", "validation"

RawDatasets = DatasetDict | IterableDatasetDict


class DataError(ValueError):
    """The data the user pointed at cannot be used as asked: say what is wrong and what to do instead."""


def split_file_list(files: str | os.PathLike | Iterable[str | os.PathLike] | None) -> list[str]:
    """`"a.txt,b.txt"`, `["a.txt", "b.txt,c.txt"]`, `Path("a.txt")` -> a flat list of paths ([] for None).

    Command lines give `--train_file` either repeated or comma-separated; both end up here.
    """
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    flat = []
    for item in files:
        flat += [part.strip() for part in str(item).split(",") if part.strip()]
    return flat


def expand_data_files(files: Sequence[str], role: str = "training") -> list[str]:
    """Expand glob patterns and check that every file exists; the error names all missing ones at once."""
    expanded, missing = [], []
    for pattern in files:
        if glob.has_magic(pattern):
            matches = sorted(path for path in glob.glob(pattern, recursive=True) if Path(path).is_file())
            (expanded.extend(matches) if matches else missing.append(f"{pattern} (the pattern matches no file)"))
        elif Path(pattern).is_file():
            expanded.append(pattern)
        else:
            missing.append(f"{pattern} ({'a directory' if Path(pattern).is_dir() else 'not found'})")
    if missing:
        raise FileNotFoundError(f"These {role} files cannot be read: {', '.join(missing)}.")
    return expanded


def file_builder(files: Sequence[str]) -> tuple[str, dict]:
    """The `datasets` builder (and its keyword arguments) for a list of files of one format."""
    by_format: dict[str, list[str]] = {}
    for path in files:
        suffix = Path(path).suffix.lower()
        if suffix not in FILE_BUILDERS:
            raise DataError(f"Cannot read {path}: unsupported extension {suffix or '(none)'!r}; supported: "
                            f"{', '.join(FILE_BUILDERS)}.")
        by_format.setdefault(suffix.replace(".text", ".txt").replace(".jsonl", ".json"), []).append(path)
    if len(by_format) > 1:
        listed = "; ".join(f"{kind}: {', '.join(paths)}" for kind, paths in by_format.items())
        raise DataError(f"All data files must have one format, but these differ ({listed}). Convert them to one "
                        "format, or train on one kind at a time.")
    name, kwargs = FILE_BUILDERS[next(iter(by_format))]
    return name, dict(kwargs)


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """A directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    path = Path(path)
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file() or ((path / "dataset_info.json").is_file() and (path / "state.json").is_file())
    )


def load_raw_datasets(
    train_files: str | Iterable[str] | None = None,
    validation_files: str | Iterable[str] | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    validation_split_percentage: float = 5.0,
    streaming: bool = False,
    required_columns: Sequence[str] | dict[str, str] = (),
    sample_by: str = "paragraph",
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> RawDatasets:
    """Load rows for training: a `DatasetDict` with "train" and, where possible, "validation".

    Args:
        train_files: local files (paths, globs, or one comma-separated string); see the module docstring for formats.
        validation_files: local files for the validation split. Without them, the dataset's own "validation" split is
            used, or else the last `validation_split_percentage` % of the training rows are held out (in streaming
            mode, where the length is unknown, every `100 / validation_split_percentage`-th row).
        dataset_name: a Hub dataset id (`"wikitext"`) or a directory written by `save_to_disk`. Exclusive with
            `train_files`.
        dataset_config_name: the Hub dataset's configuration (`"wikitext-2-raw-v1"`).
        validation_split_percentage: 0 keeps every row for training (no validation split).
        streaming: read rows lazily (corpora larger than memory): returns an `IterableDatasetDict`.
        required_columns: columns every split must have (e.g. the text column), or {column: the flag that names it};
            the error names the columns that exist and the flag to pick another.
        sample_by: for .txt files, what one row is: a "line", a "paragraph" (text between blank lines) or the whole
            "document" (file). Each row is one document to the packer (EOS between documents).
    """
    train_files = split_file_list(train_files)
    validation_files = split_file_list(validation_files)
    if sample_by not in SAMPLE_BY:
        raise DataError(f"sample_by={sample_by!r} is not one of {', '.join(SAMPLE_BY)}.")
    if not 0 <= validation_split_percentage < 100:
        raise DataError(f"validation_split_percentage={validation_split_percentage} must be in [0, 100).")
    if bool(train_files) == bool(dataset_name):
        raise DataError("Give the training data either as files (--train_file) or as a dataset (--dataset_name: a Hub "
                        "dataset id or a directory saved with save_to_disk), not " +
                        ("both." if train_files else "neither."))

    if train_files:
        raw = _load_files(train_files, validation_files, streaming, sample_by, cache_dir)
    elif is_saved_dataset(dataset_name):
        raw = _load_saved(dataset_name, streaming)
    elif Path(dataset_name).exists() and not Path(dataset_name).is_dir():
        raise DataError(f"--dataset_name {dataset_name} is a file; pass files with --train_file instead.")
    else:  # a Hub id (or a local dataset script / data directory, which load_dataset reads too)
        raw = load_dataset(dataset_name, dataset_config_name, streaming=streaming, cache_dir=cache_dir, token=token)
        raw = _as_dict(raw, streaming)
    if validation_files and not train_files:
        validation = _load_files(validation_files, [], streaming, sample_by, cache_dir)[TRAIN_SPLIT]
        raw[VALIDATION_SPLIT] = validation

    if TRAIN_SPLIT not in raw:
        raise DataError(f"The dataset has no {TRAIN_SPLIT!r} split; its splits are {', '.join(raw)}.")
    raw = (IterableDatasetDict if streaming else DatasetDict)(
        {name: split for name, split in raw.items() if name in (TRAIN_SPLIT, VALIDATION_SPLIT)}
    )
    for name, split in raw.items():
        check_columns(split, required_columns, name)
        if not streaming and len(split) == 0:
            raise DataError(f"The {name} split is empty (0 rows): the corpus has no text. Check the files or dataset.")
    if VALIDATION_SPLIT not in raw and validation_split_percentage > 0:
        raw = hold_out_validation(raw[TRAIN_SPLIT], validation_split_percentage)
    return raw


def _load_files(train_files, validation_files, streaming, sample_by, cache_dir) -> RawDatasets:
    data_files = {TRAIN_SPLIT: expand_data_files(train_files, "training")}
    if validation_files:
        data_files[VALIDATION_SPLIT] = expand_data_files(validation_files, "validation")
    builder, kwargs = file_builder([path for paths in data_files.values() for path in paths])
    if builder == "text":
        kwargs.update(sample_by=sample_by, keep_linebreaks=True)
    empty = [path for paths in data_files.values() for path in paths if Path(path).stat().st_size == 0]
    if len(empty) == sum(map(len, data_files.values())):
        raise DataError(f"The corpus is empty: every data file is empty ({', '.join(empty)}).")
    try:
        with _quiet_logger("datasets"):  # its log line on a bad file names a 0-based row with a misleading reason
            raw = load_dataset(builder, data_files=data_files, streaming=streaming, cache_dir=cache_dir, **kwargs)
    except Exception as error:  # datasets' error buries the file and row (0-based) in a long traceback
        _explain_read_error([path for paths in data_files.values() for path in paths], error)
    if builder == "text":  # blank lines (sample_by="line") are no documents
        raw = raw.filter(lambda row: not row["text"].isspace() and row["text"] != "", **(
            {} if streaming else {"desc": "Dropping blank lines"}))
    return raw


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _explain_read_error(paths: Sequence[str], error: Exception) -> None:
    """After `datasets` failed to read files: find the first bad line ourselves and raise one message naming the
    file, the line (1-based) and what is wrong (`files.DataFileError`); if every line reads, datasets' error in one
    line."""
    for path in paths:
        files.check_data_file(path)
    raise DataError(f"Could not read {', '.join(paths)}: {type(error).__name__}: {error}") from error


def _load_saved(path: str, streaming: bool) -> RawDatasets:
    saved = load_from_disk(path)
    saved = DatasetDict({TRAIN_SPLIT: saved}) if isinstance(saved, Dataset) else saved
    if streaming:
        return IterableDatasetDict({name: split.to_iterable_dataset() for name, split in saved.items()})
    return saved


def _as_dict(raw, streaming: bool) -> RawDatasets:
    if isinstance(raw, (DatasetDict, IterableDatasetDict)):
        return raw
    return (IterableDatasetDict if streaming else DatasetDict)({TRAIN_SPLIT: raw})


def hold_out_validation(train: Dataset | IterableDataset, percentage: float) -> RawDatasets:
    """Split rows into train and validation. In memory: the last `percentage` % of rows (contiguous, so neighbouring
    lines of one text do not end up on both sides). Streaming: every `round(100 / percentage)`-th row."""
    if isinstance(train, IterableDataset):
        every = max(2, round(100 / percentage))
        return IterableDatasetDict({
            TRAIN_SPLIT: train.filter(lambda _, index: index % every != 0, with_indices=True),
            VALIDATION_SPLIT: train.filter(lambda _, index: index % every == 0, with_indices=True),
        })
    num_validation = int(len(train) * percentage / 100)
    if num_validation == 0 or num_validation == len(train):
        raise DataError(
            f"Cannot hold out {percentage}% of {len(train)} rows for validation. Give a validation file "
            "(--validation_file), more data, or --validation_split_percentage 0 to train without validation."
        )
    cut = len(train) - num_validation
    return DatasetDict({TRAIN_SPLIT: train.select(range(cut)), VALIDATION_SPLIT: train.select(range(cut, len(train)))})


def column_names(split: Dataset | IterableDataset) -> list[str]:
    """The columns of a split; streamed Hub datasets may not declare them, so peek at the first row."""
    if split.column_names is not None:
        return list(split.column_names)
    first = next(iter(split), None)
    return list(first) if first is not None else []


def check_columns(split: Dataset | IterableDataset, required: Sequence[str] | dict[str, str],
                  split_name: str = "train") -> None:
    """Every `required` column must exist; the error lists those that do and the flag that picks each missing one
    (`required` may map a column to its flag, e.g. {"label": "--label_column"}; default: --text_column)."""
    flags = required if isinstance(required, dict) else dict.fromkeys(required, "--text_column")
    names = column_names(split)
    missing = [column for column in flags if column not in names]
    if missing:
        choose = " and ".join(dict.fromkeys(flags[column] for column in missing))
        raise DataError(
            f"The {split_name} data has no column {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(map(repr, names)) or '(none)'}. Choose {'one' if len(missing) == 1 else 'them'} with "
            f"{choose}."
        )


__all__ = [
    "DataError",
    "FILE_BUILDERS",
    "SAMPLE_BY",
    "TRAIN_SPLIT",
    "VALIDATION_SPLIT",
    "check_columns",
    "column_names",
    "expand_data_files",
    "hold_out_validation",
    "is_saved_dataset",
    "load_raw_datasets",
    "split_file_list",
]

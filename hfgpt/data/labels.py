"""Labelled rows for sequence classification: load them, name the classes, turn label values into class ids.

    raw, label_names = load_labelled_datasets(train_files="sms_spam.tsv", text_column="text", label_column="label")
    id2label, label2id = label_mappings(label_names)      # -> model config

Rows come through `hfgpt.data.sources.load_raw_datasets` (CSV / TSV / JSONL files, a saved dataset, a Hub dataset).
The classes are the label values of the training split: a `datasets.ClassLabel` column keeps its own names and
order; other values are sorted (numerically when they are all integers, so 0/1 labels keep their ids). A value in
the validation split that training never saw is an error, not a silent new class.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from datasets import ClassLabel, DatasetDict

from .sources import TRAIN_SPLIT, DataError, load_raw_datasets

LABEL_ID_COLUMN = "label"  # what DataCollatorWithPadding / Trainer expect (renamed to "labels" in the batch)
_INTEGER = re.compile(r"^-?\d+$")


def _value_name(value, feature) -> str:
    if isinstance(feature, ClassLabel) and isinstance(value, int):
        return feature.int2str(value)
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():  # CSV readers turn an int column with gaps into floats
        return str(int(value))
    return str(value).strip()


def label_names_of(values: Iterable, feature=None) -> list[str]:
    """The classes seen in `values`: a ClassLabel's own names, else the distinct values sorted (as numbers when they
    are all integers)."""
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    names = {_value_name(value, feature) for value in values if value is not None}
    if not names:
        raise DataError("The training data has no label values (every label is empty).")
    if all(_INTEGER.match(name) for name in names):
        return sorted(names, key=int)
    return sorted(names)


def label_mappings(label_names: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    """`id2label`, `label2id` for the model config."""
    return dict(enumerate(label_names)), {name: index for index, name in enumerate(label_names)}


def encode_labels(values: Iterable, label2id: dict[str, int], feature=None, where: str = "the data") -> list[int]:
    """Class ids of `values` by their names in `label2id`. An unknown or missing value is an error that lists the
    classes the model knows."""
    ids, unknown = [], {}
    for row, value in enumerate(values):
        name = None if value is None else _value_name(value, feature)
        if name in label2id:
            ids.append(label2id[name])
        else:
            unknown.setdefault(repr(value), row)
    if unknown:
        shown = ", ".join(f"{value} (first at row {row})" for value, row in list(unknown.items())[:10])
        raise DataError(
            f"{where} has label values the model was not trained on: {shown}. The known labels are "
            f"{', '.join(map(repr, label2id))}. Fix those rows, or train with data that contains every label."
        )
    return ids


def load_labelled_datasets(
    train_files: str | Iterable[str] | None = None,
    validation_files: str | Iterable[str] | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    validation_split_percentage: float = 10.0,
    label_names: Sequence[str] | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> tuple[DatasetDict, list[str]]:
    """Rows with `text_column` (str) and `label` (class id), split into "train" and (when there is one or one can be
    held out) "validation", and the class names in id order.

    `label_names` fixes the classes and their order (e.g. ["ham", "spam"] so that spam is the positive class 1);
    by default they come from the training split, see the module docstring.
    """
    if text_column == label_column:
        raise DataError(f"--text_column and --label_column are both {text_column!r}; they must name two columns.")
    if text_column == LABEL_ID_COLUMN:
        raise DataError(f"The text column cannot be called {LABEL_ID_COLUMN!r}: that name holds the class ids. "
                        "Rename the column in the data.")
    raw = load_raw_datasets(
        train_files=train_files,
        validation_files=validation_files,
        dataset_name=dataset_name,
        dataset_config_name=dataset_config_name,
        validation_split_percentage=validation_split_percentage,
        required_columns={text_column: "--text_column", label_column: "--label_column"},
        cache_dir=cache_dir,
        token=token,
    )
    feature = raw[TRAIN_SPLIT].features.get(label_column)
    if label_names is None:
        label_names = label_names_of(raw[TRAIN_SPLIT][label_column], feature)
    label_names = [str(name) for name in label_names]
    if len(label_names) < 2:
        raise DataError(f"Classification needs at least two classes, but the training labels are only "
                        f"{label_names}. Check --label_column ({label_column!r}).")
    _, label2id = label_mappings(label_names)

    encoded = {}
    for split_name, split in raw.items():
        ids = encode_labels(split[label_column], label2id, split.features.get(label_column),
                            where=f"The {split_name} split (column {label_column!r})")
        empty = [row for row, text in enumerate(split[text_column]) if text is None]
        if empty:
            raise DataError(f"The {split_name} split has rows without text in column {text_column!r} "
                            f"(rows {empty[:10]}). Remove them or fill them in.")
        encoded[split_name] = split.select_columns([text_column]).add_column(LABEL_ID_COLUMN, ids)
    return DatasetDict(encoded), label_names


__all__ = [
    "LABEL_ID_COLUMN",
    "encode_labels",
    "label_mappings",
    "label_names_of",
    "load_labelled_datasets",
]

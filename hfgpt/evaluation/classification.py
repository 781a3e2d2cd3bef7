"""Classification metrics with scikit-learn: accuracy, precision, recall, F1 and the confusion matrix.

`compute_accuracy` is the Hub's `evaluate-metric/accuracy`: `sklearn.metrics.accuracy_score(references,
predictions, normalize=..., sample_weight=...)`. `compute_classification` bundles what the Hub spreads over
`precision`, `recall`, `f1` and `confusion_matrix`, with the same scikit-learn calls and arguments; the only
difference is the default `average="macro"` (the Hub's single metrics default to "binary", which fails on more than
two classes). Pass `average="binary"` to get exactly the Hub numbers for a two-class problem.
"""

from .inputs import check_predictions_references

AVERAGES = ("binary", "micro", "macro", "weighted", None)


def _to_builtin(value):
    """numpy scalars/arrays to plain Python, so results go straight into JSON."""
    return value.tolist() if hasattr(value, "tolist") else value


def compute_accuracy(predictions, references, normalize: bool = True, sample_weight=None) -> dict:
    from sklearn.metrics import accuracy_score

    check_predictions_references(predictions, references)
    accuracy = accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
    return {"accuracy": float(accuracy)}


def compute_classification(
    predictions,
    references,
    labels=None,
    average: str | None = "macro",
    pos_label=1,
    sample_weight=None,
    zero_division="warn",
) -> dict:
    """Accuracy, precision, recall, F1 (averaged as `average` says; per class with `average=None`) and the confusion
    matrix (rows: true label, columns: predicted label, both in the order of the returned `labels`)."""
    import numpy as np
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    check_predictions_references(predictions, references)
    if average not in AVERAGES:
        raise ValueError(f"average={average!r} is not supported; choose one of {', '.join(map(repr, AVERAGES))}.")
    precision, recall, f1, _ = precision_recall_fscore_support(
        references, predictions, labels=labels, pos_label=pos_label, average=average,
        sample_weight=sample_weight, zero_division=zero_division,
    )
    if labels is None:  # scikit-learn's own default order: the sorted union of both
        labels = sorted(set(np.asarray(references).tolist()) | set(np.asarray(predictions).tolist()))
    matrix = confusion_matrix(references, predictions, labels=labels, sample_weight=sample_weight)
    return {
        "accuracy": float(accuracy_score(references, predictions, sample_weight=sample_weight)),
        "precision": _to_builtin(precision),
        "recall": _to_builtin(recall),
        "f1": _to_builtin(f1),
        "average": average,
        "labels": _to_builtin(list(labels)),
        "confusion_matrix": matrix.tolist(),
    }

"""Accuracy, precision, recall, F1 and the confusion matrix in one `evaluate` module shipped with hfgpt (offline).

    classification = evaluate.load(metric_path("classification"))
    classification.compute(predictions=[0, 2, 1], references=[0, 1, 1], average="macro")

The computation lives in `hfgpt.evaluation.classification.compute_classification` (the same scikit-learn calls as
the Hub's `precision`, `recall`, `f1` and `confusion_matrix` metrics; default average "macro").
"""

import datasets
import evaluate

from hfgpt.evaluation.classification import compute_classification

_DESCRIPTION = """
Single-label classification metrics: accuracy, precision, recall and F1 (averaged over classes as `average` says)
and the confusion matrix (rows: true label, columns: predicted label).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
    labels (list of int): the classes to report and their order; default: the sorted union of both lists.
    average (str or None): "macro" (default), "micro", "weighted", "binary" (uses pos_label) or None (per class).
    pos_label (int): the positive class for average="binary". Defaults to 1.
    sample_weight (list of float): weight per example.
    zero_division ("warn", 0.0, 1.0 or nan): value when a ratio divides by zero. Defaults to "warn" (0 and a warning).
Returns:
    accuracy, precision, recall, f1, average, labels, confusion_matrix.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html#classification-metrics"],
        )

    def _compute(self, predictions, references, labels=None, average="macro", pos_label=1, sample_weight=None,
                 zero_division="warn"):
        return compute_classification(predictions, references, labels=labels, average=average, pos_label=pos_label,
                                      sample_weight=sample_weight, zero_division=zero_division)

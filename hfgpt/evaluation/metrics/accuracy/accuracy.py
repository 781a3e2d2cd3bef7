"""Accuracy, as an `evaluate` module shipped with hfgpt (loads offline): a drop-in for the Hub's `accuracy`.

    accuracy = evaluate.load(metric_path("accuracy"))            # or ..., "multilabel") for label sets
    accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])   # {"accuracy": 0.666...}

Same computation as the Hub metric: `sklearn.metrics.accuracy_score(references, predictions, normalize=...,
sample_weight=...)` (see `hfgpt.evaluation.classification`).
"""

import datasets
import evaluate

from hfgpt.evaluation.classification import compute_accuracy

_DESCRIPTION = """
Accuracy is the proportion of correct predictions: (TP + TN) / (TP + TN + FP + FN). With the "multilabel"
configuration a prediction is correct only when its whole label set matches.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels (lists of 0/1 per label with the "multilabel" configuration).
    references (list of int): true labels.
    normalize (bool): return the fraction correct (True, default) or the count correct (False).
    sample_weight (list of float): weight per example. Defaults to None.
Returns:
    accuracy (float).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        label = datasets.Value("int32")
        if self.config_name == "multilabel":
            label = datasets.Sequence(label)
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": label, "references": label}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        return compute_accuracy(predictions, references, normalize=normalize, sample_weight=sample_weight)

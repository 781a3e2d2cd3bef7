"""ROUGE, as an `evaluate` module shipped with hfgpt (loads offline): a drop-in for the Hub's `rouge`.

    rouge = evaluate.load(metric_path("rouge"))
    rouge.compute(predictions=["the cat sat"], references=["the cat sat down"])

The computation lives in `hfgpt.evaluation.rouge.compute_rouge`; its docstring says how it matches the Hub metric.
"""

import datasets
import evaluate

from hfgpt.evaluation.inputs import check_predictions_references
from hfgpt.evaluation.rouge import compute_rouge

_DESCRIPTION = """
ROUGE (Lin, 2004) measures the overlap between a generated text and one or more references: rouge1/rouge2 count
shared unigrams/bigrams, rougeL the longest common subsequence, rougeLsum the LCS over newline-separated sentences.
Scores are F-measures in [0, 1], computed with Google's `rouge_score` package.
"""

_CITATION = """
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/W04-1013",
    pages = "74--81",
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts.
    references (list of str, or list of list of str): one reference, or several, per prediction.
    rouge_types (list of str): defaults to ["rouge1", "rouge2", "rougeL", "rougeLsum"].
    use_aggregator (bool): return aggregated scores (bootstrap `mid`) instead of per-example lists. Defaults to True.
    use_stemmer (bool): Porter-stem words before matching. Defaults to False.
    tokenizer: an object with `.tokenize(text)` or a function text -> list of tokens; default: rouge_score's.
Returns:
    {rouge_type: F-measure} (or {rouge_type: [F-measure per example]} with use_aggregator=False).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({
                    "predictions": datasets.Value("string", id="sequence"),
                    "references": datasets.Sequence(datasets.Value("string", id="sequence")),
                }),
                datasets.Features({
                    "predictions": datasets.Value("string", id="sequence"),
                    "references": datasets.Value("string", id="sequence"),
                }),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://aclanthology.org/W04-1013"],
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Compute ROUGE (evaluate appends the arguments below)."""
        # `evaluate` picks between the two feature sets by looking at the first example, so an empty or unpaired
        # input would fail there with an IndexError; check first to say what is wrong.
        if predictions is not None or references is not None:
            check_predictions_references(predictions, references)
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references, rouge_types=None, use_aggregator=True, use_stemmer=False,
                 tokenizer=None):
        return compute_rouge(predictions, references, rouge_types=rouge_types, use_aggregator=use_aggregator,
                             use_stemmer=use_stemmer, tokenizer=tokenizer)

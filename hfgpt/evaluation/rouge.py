"""ROUGE between generated texts and references, computed with Google's `rouge_score` package.

Same computation as the Hub's `evaluate-metric/rouge` (checked against its documented behaviour, and tested here
against `rouge_score` called directly):
- `rouge_score.rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer, tokenizer=tokenizer)` with the
  defaults `rouge_types = rouge1, rouge2, rougeL, rougeLsum` and `use_stemmer=False`;
- a list of references per prediction is scored with `score_multi` (the best-matching reference counts);
- only the F-measure is reported;
- with `use_aggregator=True` the per-example scores go through `rouge_score.scoring.BootstrapAggregator` (1000
  resamples) and the result is its `mid` value: the median of the resampled means, which is within a hair of the
  plain mean and depends on numpy's random state (`evaluate.load(..., seed=N)` fixes it). With
  `use_aggregator=False` the per-example F-measures are returned as lists.
- `rougeLsum` treats newlines as sentence boundaries; put each sentence on its own line (e.g. with
  `nltk.sent_tokenize`) if you want summary-level LCS, otherwise it equals `rougeL` on single-line texts.
"""

import re

from .inputs import check_predictions_references

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_ROUGE_TYPE = re.compile(r"^rouge([1-9]|L|Lsum)$")


class _CallableTokenizer:
    """Adapts a `text -> list[str]` function to the `.tokenize` interface `rouge_score` expects."""

    def __init__(self, function):
        self.tokenize = function


def compute_rouge(
    predictions: list[str],
    references: list[str] | list[list[str]],
    rouge_types: list[str] | None = None,
    use_aggregator: bool = True,
    use_stemmer: bool = False,
    tokenizer=None,
) -> dict:
    """ROUGE F-measures, `{rouge_type: score}` (or `{rouge_type: [score per example]}` without the aggregator)."""
    from rouge_score import rouge_scorer, scoring

    check_predictions_references(predictions, references)
    rouge_types = list(ROUGE_TYPES if rouge_types is None else rouge_types)
    unknown = [name for name in rouge_types if not _ROUGE_TYPE.match(name)]
    if unknown or not rouge_types:
        raise ValueError(
            f"Unknown rouge_types {unknown or rouge_types}; use rouge1 ... rouge9 (n-gram overlap), rougeL (longest "
            "common subsequence) or rougeLsum (LCS over newline-separated sentences)."
        )
    if tokenizer is not None and not hasattr(tokenizer, "tokenize"):
        tokenizer = _CallableTokenizer(tokenizer)
    scorer = rouge_scorer.RougeScorer(rouge_types=rouge_types, use_stemmer=use_stemmer, tokenizer=tokenizer)
    multi_reference = isinstance(references[0], (list, tuple))
    scores = [
        scorer.score_multi(reference, prediction) if multi_reference else scorer.score(reference, prediction)
        for prediction, reference in zip(predictions, references)
    ]
    if not use_aggregator:
        return {name: [score[name].fmeasure for score in scores] for name in rouge_types}
    aggregator = scoring.BootstrapAggregator()
    for score in scores:
        aggregator.add_scores(score)
    return {name: float(value.mid.fmeasure) for name, value in aggregator.aggregate().items()}

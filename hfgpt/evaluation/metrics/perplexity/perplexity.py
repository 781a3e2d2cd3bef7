"""Perplexity of a causal language model, as an `evaluate` module shipped with hfgpt (loads offline).

    import evaluate
    from hfgpt.evaluation import metric_path

    perplexity = evaluate.load(metric_path("perplexity"))
    perplexity.compute(predictions=texts, model=model_or_path, tokenizer=tokenizer, stride=512)

The computation lives in `hfgpt.evaluation.perplexity.compute_perplexity`; its docstring says how it relates to the
Hub's `perplexity` metric.
"""

import datasets
import evaluate

from hfgpt.evaluation.perplexity import compute_perplexity

_DESCRIPTION = """
Perplexity is the exponential of the mean negative log-likelihood a causal language model assigns to the tokens of
a text: lower is better, and a model that guesses uniformly over V tokens scores V. Texts longer than the model's
context are scored with a strided sliding window, every token exactly once.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts to score.
    model: a causal LM object (hfgpt or any transformers model), a local directory or a Hub id.
    model_id (str): alias of `model` for a path or Hub id, as the Hub's perplexity metric names it.
    tokenizer: tokenizer object, path or Hub id (defaults to the model's when the model is given by path).
    batch_size (int): windows per forward pass. Defaults to 16.
    add_start_token (bool): prepend BOS so the first token is scored; default: when the tokenizer has a BOS token.
    max_length (int): tokens per window; defaults to the model's context length.
    stride (int): tokens newly scored per window; defaults to max_length // 2.
    device (str): "cpu", "cuda", "cuda:1", "mps"; default keeps an in-memory model where it is.
    trust_remote_code (bool): for loading a non-hfgpt remote-code model by path.
Returns:
    perplexities (list of float): one per text.
    mean_perplexity (float): the mean of `perplexities` (what the Hub metric reports).
    perplexity (float): exp(total NLL / total scored tokens) over all texts.
    mean_nll (float), num_tokens (int), max_length (int), stride (int).
Examples:
    >>> perplexity = evaluate.load(metric_path("perplexity"))
    >>> perplexity.compute(predictions=["The cat sat on the mat."], model="path/to/model")["perplexity"]
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(self, predictions, model=None, model_id=None, tokenizer=None, batch_size=16, add_start_token=None,
                 max_length=None, stride=None, device=None, trust_remote_code=False, progress=True):
        if (model is None) == (model_id is None):
            raise ValueError("Pass exactly one of `model` (an object, a path or a Hub id) and `model_id`.")
        return compute_perplexity(
            predictions, model if model is not None else model_id, tokenizer, batch_size=batch_size,
            add_start_token=add_start_token, max_length=max_length, stride=stride, device=device,
            trust_remote_code=trust_remote_code, progress=progress,
        )

"""Perplexity of a causal language model on texts, with a sliding window for texts longer than the context.

Per text, perplexity = exp(mean negative log-likelihood of its tokens). A text longer than `max_length` tokens is
scored with the strided sliding window of the transformers "Perplexity of fixed-length models" guide: windows of
`max_length` tokens start every `stride` tokens; each window scores only the tokens the previous window did not, so
every token is scored exactly once, with at least `max_length - stride` tokens of context (except near the start).

Relation to the Hub's `evaluate-metric/perplexity`: same inputs (`predictions` = the texts), same tokenisation
(`add_special_tokens=False`, optionally a BOS token prepended so the first token is scored), same per-text formula,
same outputs `perplexities` (one per text) and `mean_perplexity` (their unweighted mean). For texts that fit in
`max_length` the numbers are the same. Differences: the Hub truncates longer texts, this module slides a window
instead; it also reports the corpus-level `perplexity` = exp(total NLL / total scored tokens), the number usually
quoted for a dataset, and accepts an in-memory model as well as a model id or path.
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..onednn import onednn_linears
from .loading import load_model, load_tokenizer, resolve_device


@dataclass(frozen=True)
class Window:
    """Tokens `begin:end` of one text go through the model; tokens `first_target:end` are scored."""

    text_index: int
    begin: int
    end: int
    first_target: int


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) for each window over a sequence of `num_tokens` tokens.

    The first token can never be scored (nothing precedes it), so the targets are tokens 1..num_tokens-1; each is
    scored in exactly one window, predicted from the tokens `begin..target-1`.
    """
    if not 1 <= stride < max_length:
        raise ValueError(
            f"stride={stride} must be in [1, max_length - 1] = [1, {max_length - 1}]: each window scores `stride` "
            f"new tokens and keeps max_length - stride tokens of context (at least one)."
        )
    windows, previous_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        first_target = max(previous_end, begin + 1)
        if first_target < end:
            windows.append((begin, end, first_target))
        previous_end = end
        if end == num_tokens:
            break
    return windows


def model_context_length(model) -> int | None:
    """The longest input the model accepts, from its config; None when the config does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _resolve_model_and_tokenizer(model, tokenizer, device, trust_remote_code):
    if model is None:
        raise ValueError("Pass the causal language model to score: `model=` (a model object, a path or a Hub id).")
    model_is_path = isinstance(model, (str, os.PathLike))
    if tokenizer is None:
        if not model_is_path:
            raise ValueError(
                "An in-memory model needs its tokenizer: pass `tokenizer=` (a tokenizer object, a path or a Hub id)."
            )
        tokenizer = model
    if isinstance(tokenizer, (str, os.PathLike)):  # before the model: a missing tokenizer fails fast
        tokenizer = load_tokenizer(tokenizer)
    if model_is_path:
        model = load_model(model, device=device, trust_remote_code=trust_remote_code)
    elif device is not None:
        model = model.to(resolve_device(device))
    return model, tokenizer


@torch.no_grad()
def compute_perplexity(
    texts: list[str],
    model,
    tokenizer=None,
    *,
    batch_size: int = 16,
    add_start_token: bool | None = None,
    max_length: int | None = None,
    stride: int | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict:
    """Perplexity of `model` on each of `texts` and on all of them together.

    Args:
        texts: the texts to score (at least one; each must give at least one scored token).
        model: a causal LM object (hfgpt or any transformers model), a local directory or a Hub id.
        tokenizer: a tokenizer object, path or Hub id; defaults to the model's own when `model` is a path.
        batch_size: windows per forward pass.
        add_start_token: prepend the tokenizer's BOS token so the first token of each text is scored too.
            `None` (default) does it when the tokenizer has a BOS token.
        max_length: tokens per window; defaults to the model's context length.
        stride: new tokens scored per window; defaults to max_length // 2. Smaller is slower but gives more context.
        device: where to run; `None` keeps an in-memory model where it is and puts a loaded one on the best device.
        trust_remote_code: passed to `from_pretrained` when `model` is a path of a non-hfgpt remote-code model.
        progress: show a progress bar over the batches.

    Returns:
        `perplexities` (one per text), `mean_perplexity` (their mean, as the Hub metric reports), `perplexity`
        (exp of the mean NLL over all scored tokens), `mean_nll` (nats per token), `num_tokens` (scored tokens),
        `max_length` and `stride` (the window actually used).
    """
    if isinstance(texts, str):
        raise TypeError("`texts` must be a list of strings, got a single string; wrap it in a list.")
    texts = list(texts)
    if not texts:
        raise ValueError("No texts to score: `predictions`/`texts` is empty.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    model, tokenizer = _resolve_model_and_tokenizer(model, tokenizer, device, trust_remote_code)
    model_device = next(model.parameters()).device

    model_max = model_context_length(model)
    if max_length is None:
        if model_max is None:
            raise ValueError("Cannot tell the model's context length from its config; pass `max_length`.")
        max_length = model_max
    elif model_max is not None and max_length > model_max:
        raise ValueError(f"max_length={max_length} is longer than the model's context ({model_max} tokens).")
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be at least 2 (one token of context, one to score).")
    stride = max(1, max_length // 2) if stride is None else stride

    if add_start_token is None:
        add_start_token = tokenizer.bos_token_id is not None
    elif add_start_token and tokenizer.bos_token_id is None:
        raise ValueError(
            "add_start_token=True needs a tokenizer with a BOS token, and this one has none. Pass "
            "add_start_token=False (the first token of each text is then not scored) or set tokenizer.bos_token."
        )

    sequences = []
    for index, ids in enumerate(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]):
        ids = ([tokenizer.bos_token_id] if add_start_token else []) + list(ids)
        if len(ids) < 2:
            raise ValueError(
                f"Text {index} ({texts[index][:40]!r}) gives {len(ids)} token(s) including any start token: "
                "nothing to score. Drop empty texts, or use add_start_token=True with a tokenizer that has a BOS token."
            )
        sequences.append(ids)

    windows = [
        Window(index, begin, end, first_target)
        for index, ids in enumerate(sequences)
        for begin, end, first_target in sliding_windows(len(ids), max_length, stride)
    ]
    nll_sums = [0.0] * len(sequences)
    token_counts = [0] * len(sequences)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # padded positions are masked out

    was_training = model.training
    model.eval()
    try:
        with onednn_linears(model):  # fp32 forwards at up to twice MKL's speed on x86 CPUs
            batches = range(0, len(windows), batch_size)
            for start in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
                batch = windows[start : start + batch_size]
                width = max(w.end - w.begin for w in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                labels = torch.full((len(batch), width), -100, dtype=torch.long)
                for row, w in enumerate(batch):
                    ids = torch.tensor(sequences[w.text_index][w.begin : w.end])
                    input_ids[row, : len(ids)] = ids
                    attention_mask[row, : len(ids)] = 1
                    scored = slice(w.first_target - w.begin, w.end - w.begin)
                    labels[row, scored] = ids[scored]
                logits = model(input_ids=input_ids.to(model_device),
                               attention_mask=attention_mask.to(model_device)).logits
                # Position t predicts token t+1; float32 so the log-softmax is exact whatever the model's dtype.
                token_nll = F.cross_entropy(
                    logits[:, :-1].float().transpose(1, 2), labels[:, 1:].to(model_device), ignore_index=-100,
                    reduction="none",
                )
                row_nll = token_nll.sum(dim=1).tolist()
                row_counts = (labels[:, 1:] != -100).sum(dim=1).tolist()
                for w, nll, count in zip(batch, row_nll, row_counts):
                    nll_sums[w.text_index] += nll
                    token_counts[w.text_index] += count
    finally:
        model.train(was_training)

    perplexities = [math.exp(nll / count) for nll, count in zip(nll_sums, token_counts)]
    num_tokens = sum(token_counts)
    mean_nll = sum(nll_sums) / num_tokens
    return {
        "perplexities": perplexities,
        "mean_perplexity": sum(perplexities) / len(perplexities),
        "perplexity": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "num_tokens": num_tokens,
        "max_length": max_length,
        "stride": stride,
    }

"""fp32 linear layers on this CPU: MKL (what `F.linear` uses) against oneDNN, plain and with packed weights
(what `hfgpt.onednn` uses for inference), and the memory bandwidth that bounds a decoding step.

The products are those of a model's own linear layers (the `small` shape by default: 37 layers, 55 MB of fp32
weights), run one after another at each row count: 1 and 4 rows are a decoding step at batch 1 and 4, 256 and 1,024
rows a prompt or an evaluation batch. Each timing is the median of 5 repeats. Then, at the same shape, `hfgpt eval
perplexity`'s computation on Tiny Shakespeare with and without oneDNN (alternated, after a warm-up). A benchmark,
not a test: nothing is asserted about speed.

    python bench/linear_kernels.py --threads 2
    python bench/linear_kernels.py --preset tiny --rows 1 4 --perplexity_chars 2000 --repeats 2   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.nn import functional as F

from hfgpt import HFGPTConfig, HFGPTForCausalLM
from hfgpt.evaluation import perplexity
from hfgpt.onednn import ENV_SWITCH, onednn_available, onednn_supported

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@contextlib.contextmanager
def onednn_switch(on: bool) -> Iterator[None]:
    """hfgpt's own switch ($HFGPT_ONEDNN), set for the block and restored after."""
    before = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV_SWITCH]
        else:
            os.environ[ENV_SWITCH] = before


def median_ms(run: Callable[[], object], repeats: int, calls: int) -> float:
    run()  # warm-up: oneDNN builds its kernels on first use
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def read_bandwidth_gbs(megabytes: int, repeats: int) -> float:
    """Bytes per second that `tensor.sum()` reads from a tensor much larger than the caches."""
    data = torch.ones(megabytes * 2**20 // 4)
    return data.numel() * 4 / (median_ms(data.sum, repeats, 1) / 1e3) / 1e9


def byte_tokenizer():
    """One token per byte, so that the perplexity run needs no trained tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {chr(i): i for i in range(256)} | {"<|endoftext|>": 256}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="the model shape (an HFGPTConfig preset)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 256, 1024])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="text for the perplexity run")
    parser.add_argument("--perplexity_chars", type=int, default=60_000, help="characters of it (0: no perplexity run)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    supported, why = onednn_supported(torch.device("cpu"))
    if not supported:
        print(f"oneDNN's fp32 linear is not available here: {why}")
        return 1
    print(f"hfgpt's choice on this machine: {'oneDNN' if onednn_available(torch.device('cpu'))[0] else 'MKL'} "
          f"({onednn_available(torch.device('cpu'))[1]})")

    torch.manual_seed(0)
    model = HFGPTForCausalLM(HFGPTConfig.from_preset(args.preset, vocab_size=257)).eval()
    layers = [module for module in model.modules() if type(module) is torch.nn.Linear]
    weights = [(layer.weight.detach(), layer.bias) for layer in layers]
    packed = [(torch.ops.mkldnn._reorder_linear_weight(weight), bias) for weight, bias in weights]
    megabytes = sum(weight.numel() for weight, _ in weights) * 4 / 1e6
    print(f"{args.preset}: {len(layers)} linear layers, {megabytes:.1f} MB of fp32 weights, "
          f"{torch.get_num_threads()} threads")
    print(f"memory read bandwidth: {read_bandwidth_gbs(256, args.repeats):.1f} GB/s (tensor.sum() over 256 MB)\n")

    print(f"{'rows':>6}  {'MKL (F.linear) ms':>18}  {'oneDNN ms':>10}  {'oneDNN packed ms':>17}  {'MKL / packed':>12}")
    with torch.no_grad():
        for rows in args.rows:
            inputs = [torch.randn(rows, weight.shape[1]) for weight, _ in weights]
            calls = max(1, 64 // rows)

            def products(kernel, pairs) -> Callable[[], None]:
                return lambda: [kernel(x, weight, bias) for x, (weight, bias) in zip(inputs, pairs)]

            mkl = median_ms(products(F.linear, weights), args.repeats, calls)
            onednn = torch.ops.mkldnn._linear_pointwise
            plain = median_ms(products(lambda x, w, b: onednn(x, w, b, "none", [], ""), weights), args.repeats, calls)
            blocked = median_ms(products(lambda x, w, b: onednn(x, w, b, "none", [], ""), packed), args.repeats,
                                calls)
            print(f"{rows:>6}  {mkl:>18.2f}  {plain:>10.2f}  {blocked:>17.2f}  {mkl / blocked:>11.2f}x")

    if args.perplexity_chars:
        text = Path(args.text).read_text()[: args.perplexity_chars]
        tokenizer = byte_tokenizer()
        window = min(256, model.config.max_position_embeddings)
        seconds = {"MKL": [], "oneDNN": []}
        for label in ["oneDNN", "MKL"] * (1 + max(1, args.repeats // 2)):  # the first pair is a warm-up
            with onednn_switch(label == "oneDNN"):
                start = time.perf_counter()
                perplexity.compute_perplexity([text], model, tokenizer, batch_size=8, max_length=window,
                                              progress=False)
                seconds[label].append(time.perf_counter() - start)
        mkl, onednn = (statistics.median(seconds[label][1:]) for label in ("MKL", "oneDNN"))
        print(f"\nperplexity of {len(text):,} characters (one token each, windows of {window}): MKL {mkl:.1f} s, "
              f"oneDNN {onednn:.1f} s ({mkl / onednn:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

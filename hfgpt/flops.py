"""How much arithmetic a model does, and how much the machine can do: FLOPs per token, the matmul peak, and MFU.

The one place that counts FLOPs (training logs, the speed benchmark and the model card all call it).

FLOPs follow the usual accounting of Kaplan et al. (2020) and PaLM (Chowdhery et al., 2022, appendix B):

    forward  = 2 N + 4 L d T        per token
    training = 6 N + 12 L d T       per token (the backward pass costs twice the forward)

N counts the parameters that take part in a matrix product (every linear layer, the output layer included, tied or
not; embedding *lookups* cost nothing), L the layers, d the width of the attention (heads x head_dim), T the sequence
length the token attends over. The attention term counts the full T x T score matrix, as is conventional, although a
causal mask leaves half of it unused; norms, activations, softmax and biases are left out (a few percent at these
shapes). Model FLOPs utilisation (MFU) is achieved FLOPs/s over the peak: here the peak is *measured* (a large matrix
product in the dtype the run computes in, on its device and thread count), not a datasheet number, so MFU says how
much of what this machine can really do a run gets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from .onednn import onednn_linear, onednn_supported

# ---------------------------------------------------------------------------------------------------------------------
# Counting


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    total: int  # every parameter, tied ones once
    embedding: int  # token and learned position tables
    # weights of the linear layers a token goes through (an output layer tied to the token table counts here too);
    # in a mixture of experts only its top-k experts' share: num_experts_per_tok / num_experts of the experts' weights
    matmul: int
    matmul_without_lm_head: int  # the same, without the output layer (classification heads do not compute logits)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def count_parameters(config) -> ParameterCounts:
    """Parameter counts of an hfgpt causal LM with this config, read off a model built on the meta device (no memory,
    no initialisation), so every architecture switch is counted as the model really has it."""
    from .modeling_hfgpt import HFGPTForCausalLM

    with torch.device("meta"):
        model = HFGPTForCausalLM(config)
    return count_model_parameters(model)


def count_model_parameters(model: nn.Module) -> ParameterCounts:
    """Parameter counts of a built model (any device); shared tensors are counted once."""
    seen, total, embedding, matmul, lm_head = set(), 0, 0, 0.0, 0
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # a sparse mixture-of-experts block (`experts`, `top_k`, `num_experts`): each token uses top_k of its experts
    share = {id(linear): block.top_k / block.num_experts for block in model.modules()
             if isinstance(getattr(block, "experts", None), nn.ModuleList) and hasattr(block, "top_k")
             for linear in block.experts.modules() if isinstance(linear, nn.Linear)}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            if id(parameter) not in seen:
                seen.add(id(parameter))
                total += parameter.numel()
                if isinstance(module, nn.Embedding):
                    embedding += parameter.numel()
        if isinstance(module, nn.Linear):
            # shapes, not numel: 4-bit weights are packed
            matmul += module.in_features * module.out_features * share.get(id(module), 1.0)
            if module is output:
                lm_head = module.in_features * module.out_features
    matmul = round(matmul)
    return ParameterCounts(total=total, embedding=embedding, matmul=matmul, matmul_without_lm_head=matmul - lm_head)


def attention_flops_per_token(config, seq_len: int) -> int:
    """Scores (q k^T) and their weighted sum of values: two products of width heads x head_dim over `seq_len`
    positions, in every layer, 2 FLOPs per multiply-add."""
    width = config.num_attention_heads * config.head_dim
    return 2 * 2 * config.num_hidden_layers * width * seq_len


def forward_flops_per_token(config, seq_len: int, lm_head: bool = True, counts: ParameterCounts | None = None) -> int:
    """2 N + 4 L d T: one forward pass, per token. `lm_head=False` for heads that compute no vocabulary logits."""
    counts = counts or count_parameters(config)
    matmul = counts.matmul if lm_head else counts.matmul_without_lm_head
    return 2 * matmul + attention_flops_per_token(config, seq_len)


def training_flops_per_token(config, seq_len: int, lm_head: bool = True, trainable_fraction: float = 1.0,
                             counts: ParameterCounts | None = None) -> int:
    """Forward + backward per token: 6 N + 12 L d T when everything trains.

    The backward pass computes gradients of the activations (2 N + the attention again, twice) and of the weights
    (2 N, but only for weights that train): with adapters or frozen blocks (`trainable_fraction` < 1 of the matmul
    weights train) it costs less, and counting 6 N would overstate the work."""
    counts = counts or count_parameters(config)
    matmul = counts.matmul if lm_head else counts.matmul_without_lm_head
    attention = attention_flops_per_token(config, seq_len)
    forward = 2 * matmul + attention
    backward = 2 * matmul + round(2 * matmul * trainable_fraction) + 2 * attention
    return forward + backward


# ---------------------------------------------------------------------------------------------------------------------
# The machine's peak

# matrix sizes for the probe: large enough to reach the peak, small enough to take about a second
_PROBE_SIZE = {"cpu": 1536, "cuda": 8192}
_CACHE_ENV = "HFGPT_CACHE"


def _cache_file() -> Path:
    root = os.environ.get(_CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "hfgpt")
    return Path(root).expanduser() / "matmul_peak.json"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


# Bumped when the measurement changes, so that values measured the old way are not reused (2: oneDNN's fp32 product)
_PEAK_METHOD = 2


def _peak_key(device: torch.device, dtype: torch.dtype) -> str:
    return (f"{device.type}|{_device_name(device)}|{str(dtype).removeprefix('torch.')}|torch {torch.__version__}"
            f"|method {_PEAK_METHOD}")


def measure_matmul_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        size: int | None = None, seconds: float = 0.5) -> float:
    """FLOP/s of the fastest of several square matrix products in `dtype` on `device` (about `seconds` of work per
    kernel). fp32 on an x86 CPU: the faster of MKL's (`torch.matmul`) and oneDNN's product, which hfgpt uses where it
    is faster (hfgpt.onednn; 475 against 212 GFLOP/s on the development CPU)."""
    device = torch.device(device)
    size = size or _PROBE_SIZE.get(device.type, 4096)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    kernels = [lambda: torch.matmul(a, b)]
    if dtype == torch.float32 and onednn_supported(device)[0]:
        kernels.append(lambda: onednn_linear(a, b, None))  # a @ b^T: the same FLOPs

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best = float("inf")
    with torch.no_grad():
        for kernel in kernels:
            kernel()  # warm-up: thread pools, kernels, clocks
            sync()
            fastest, spent = float("inf"), 0.0
            while spent < seconds or fastest == float("inf"):
                start = time.perf_counter()
                kernel()
                sync()
                elapsed = time.perf_counter() - start
                fastest, spent = min(fastest, elapsed), spent + elapsed
            best = min(best, fastest)
    return 2 * size**3 / best


def matmul_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", refresh: bool = False) -> float:
    """`measure_matmul_peak`, measured once per device, dtype, thread count and torch version, then read from
    ~/.cache/hfgpt/matmul_peak.json (or $HFGPT_CACHE). `refresh=True` measures again and keeps the higher of the two
    (a peak is a maximum: a measurement on a busy machine only comes out lower)."""
    device = torch.device(device)
    key = _peak_key(device, dtype)
    path = _cache_file()
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    if not refresh and isinstance(cached.get(key), (int, float)):
        return float(cached[key])
    peak = measure_matmul_peak(dtype, device)
    if isinstance(cached.get(key), (int, float)):
        peak = max(peak, float(cached[key]))
    cached[key] = peak
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measure again next time
    return peak


def mfu(flops_per_second: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: the fraction of the measured peak a run achieves."""
    return flops_per_second / peak_flops_per_second if peak_flops_per_second > 0 else float("nan")


__all__ = [
    "ParameterCounts",
    "attention_flops_per_token",
    "count_model_parameters",
    "count_parameters",
    "forward_flops_per_token",
    "matmul_peak",
    "measure_matmul_peak",
    "mfu",
    "training_flops_per_token",
]

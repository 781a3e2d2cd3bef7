"""fp32 linear layers through oneDNN for inference on x86 CPUs: decoding, perplexity and accuracy evaluation.

Why: an fp32 `nn.Linear` on a CPU goes to MKL's sgemm/sgemv, which on this project's AMD EPYC runs at about half the
speed of oneDNN's fp32 matmul (the other library inside every x86 torch wheel, which torch itself uses for bf16 and for
inductor's frozen CPU graphs). Measured on the `small` shape's 37 linear layers, 2 threads: one token (a decoding
step) 3.4 ms with MKL against 1.6 ms with oneDNN and 1.4 ms with the weights in oneDNN's blocked layout; four tokens
5.3 against 2.2 and 1.4 ms; 256 rows (a prompt) 42 against 17 ms; 1,024 rows 148 against 83 ms. The arithmetic is the
same (fp32 products and sums in another order: results agree to ~1e-6 relative).

`onednn_linears(model)` routes the model's plain fp32 `nn.Linear` layers through `torch.ops.mkldnn._linear_pointwise`
for the duration of a `with` block and restores them after. On entry it copies each weight into oneDNN's blocked
layout (20 ms and the weights' size in memory for the `small` shape's 55 MB, held until the block ends), and again
when a weight changed in place inside the block (eager calls only: a compiled step keeps the copy made on entry). A
layer still takes the ordinary path whenever gradients are on, autocast is on, or the input is not fp32, so a training
step inside the block computes what it would outside; and for one row (a batch-1 decoding step) when the model's
linear weights fit in the CPU's last-level cache, where MKL's matrix-vector product is the quicker one. Under torch.compile the call is the custom op
`hfgpt::onednn_linear`, as inductor lowers oneDNN's op only for frozen (constant) weights.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import types
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


def onednn_available(device: torch.device) -> tuple[bool, str]:
    """Whether `onednn_linears` does anything on `device`, and why."""
    if device.type != "cpu":
        return False, f"oneDNN's fp32 linear is a CPU kernel (the model is on {device.type})"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"measured on x86 CPUs only (this is {platform.machine()})"
    if not torch.backends.mkldnn.is_available() or not all(
            hasattr(torch.ops.mkldnn, op) for op in ("_linear_pointwise", "_reorder_linear_weight")):
        return False, "this torch build has no oneDNN"
    return True, "x86 CPU with oneDNN"


# The op compiled steps call. Registered through `torch.library.Library` rather than `torch.library.custom_op`, whose
# Python wrapper costs 9-10 us a call against 2-4 us here (37 calls a decoding step at the `small` shape); inference
# only, so no autograd formula.
_LIBRARY = torch.library.Library("hfgpt", "DEF")
_LIBRARY.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed by oneDNN (fp32 in, fp32 out; `weight` as `_reorder_linear_weight` packs
    it, or plain)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


_LIBRARY.impl("onednn_linear", _onednn_linear, "CompositeExplicitAutograd")  # the packed weight is an MkldnnCPU tensor


@torch.library.register_fake("hfgpt::onednn_linear", lib=_LIBRARY)
def _onednn_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


onednn_linear = torch.ops.hfgpt.onednn_linear.default


@functools.cache  # read once: every generate() call asks
def last_level_cache_bytes() -> int:
    """The CPU's largest cache (Linux's sysfs), or 32 MiB where it does not say."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        with contextlib.suppress(OSError, ValueError):
            text = path.read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1))
    return max(sizes, default=32 * 2**20)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or x.dtype != torch.float32 \
            or self.weight.dtype != torch.float32:
        return F.linear(x, self.weight, self.bias)
    if x.numel() == x.shape[-1] and not self._onednn_for_one_row:  # one token, weights held in cache: MKL is quicker
        return F.linear(x, self.weight, self.bias)
    if torch.compiler.is_compiling():  # compiled steps take the weights as packed on entry
        return onednn_linear(x, self._packed, self.bias)
    if self._packed_version != self.weight._version:  # changed in place inside the block (an optimizer step)
        _pack(self)
    return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")  # skips the op's wrapper


def _pack(layer: nn.Linear) -> None:
    layer._packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach())
    layer._packed_version = layer.weight._version


@contextlib.contextmanager
def onednn_linears(model: nn.Module) -> Iterator[int]:
    """Inside the block, `model`'s fp32 `nn.Linear` layers on an x86 CPU compute through oneDNN with packed copies of
    their weights (see the module docstring); yields how many layers it routed (0 where `onednn_available` says no)."""
    layers = [module for module in model.modules()
              if type(module) is nn.Linear and type(module.weight.data) is torch.Tensor  # not sharded (DTensor)
              and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32
              and "forward" not in vars(module)]
    if not layers or not onednn_available(layers[0].weight.device)[0]:
        layers = []
    # One row (a batch-1 decoding step) only pays where the weights stream from memory: for weights that stay in the
    # cache between tokens MKL's matrix-vector product is quicker than oneDNN's per-call overhead (the `mini` preset,
    # 17 MB: 0.23 against 0.39 ms a step; `small`, 55 MB: 2.5 against 1.0 ms; bench/linear_kernels.py)
    one_row = sum(layer.weight.numel() * 4 for layer in layers) > last_level_cache_bytes()
    for layer in layers:
        layer.forward = types.MethodType(_linear_forward, layer)
        layer._onednn_for_one_row = one_row
        _pack(layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward, layer._packed, layer._packed_version, layer._onednn_for_one_row


__all__ = ["last_level_cache_bytes", "onednn_available", "onednn_linear", "onednn_linears"]

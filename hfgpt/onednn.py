"""fp32 linear layers through oneDNN on x86 CPUs: for inference (decoding, perplexity and accuracy evaluation) and for
fp32 training.

Why: an fp32 `nn.Linear` on a CPU goes to MKL's sgemm/sgemv, which on this project's AMD EPYC runs at less than half
the speed of oneDNN's fp32 matmul (the other library inside every x86 torch wheel, which torch itself uses for bf16 and
for inductor's frozen CPU graphs): square products 212 against 475 GFLOP/s on 2 threads. Measured on the `small`
shape's 37 linear layers: one token (a decoding step) 3.4 ms with MKL against 1.6 ms with oneDNN and 1.4 ms with the
weights in oneDNN's blocked layout; four tokens 5.3 against 2.2 and 1.4 ms; 256 rows (a prompt) 42 against 17 ms;
1,024 rows 148 against 83 ms. The arithmetic is the same (fp32 products and sums in another order: results agree to
~1e-6 relative). MKL may well be the quicker one on other CPUs, so `onednn_available` measures both once per process
(`onednn_speedup`) and routes nothing where oneDNN is not clearly faster; `HFGPT_ONEDNN=0|1` overrides the choice.

- `onednn_linears(model)` routes the model's plain fp32 `nn.Linear` layers through `torch.ops.mkldnn._linear_pointwise`
  for the duration of a `with` block, for inference, and restores them after. On entry it copies each weight into
  oneDNN's blocked layout (20 ms and the weights' size in memory for the `small` shape's 55 MB, held until the block
  ends), and again when a weight changed in place inside the block (eager calls only: a compiled step keeps the copy
  made on entry). A layer still takes the ordinary path whenever gradients are on, autocast is on, or the input is not
  fp32; and for one row (a batch-1 decoding step) when the model's linear weights fit in the CPU's last-level cache,
  where MKL's matrix-vector product is the quicker one.
- `onednn_training_linears(model)`, a `with` block, routes the same layers' forward and backward products through
  oneDNN with the weights as they are (no packing: they change at every step), for products large enough to gain.
  hfgpt's Trainers open it around training and evaluation in an fp32 run (hfgpt.training.speed).

Under torch.compile the call is the op `hfgpt::onednn_linear`, as inductor lowers oneDNN's own op only for frozen
(constant) weights.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import time
import types
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


def onednn_supported(device: torch.device) -> tuple[bool, str]:
    """Whether this device and torch build have oneDNN's fp32 linear, and if not, why."""
    if device.type != "cpu":
        return False, f"oneDNN's fp32 linear is a CPU kernel (the model is on {device.type})"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"measured on x86 CPUs only (this is {platform.machine()})"
    if not torch.backends.mkldnn.enabled:
        return False, "oneDNN is switched off (torch.backends.mkldnn.enabled is False)"
    if not torch.backends.mkldnn.is_available() or not all(
            hasattr(torch.ops.mkldnn, op) for op in ("_linear_pointwise", "_reorder_linear_weight")):
        return False, "this torch build has no oneDNN"
    return True, "x86 CPU with oneDNN"


# oneDNN is used where its fp32 product is at least this much faster than MKL's (a margin over timing noise)
MIN_SPEEDUP = 1.2
ENV_SWITCH = "HFGPT_ONEDNN"


@functools.cache  # once per process: ~20 ms
def onednn_speedup() -> float:
    """MKL's time over oneDNN's for an fp32 product of a prompt's size (256 x 384 by 384 x 1,536, the `small` shape's
    MLP), the best of 6 alternated rounds each (the first warms up), at the current thread count. 2.0-2.2x on the
    development CPU (AMD EPYC)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 384, generator=generator)
    weight = torch.randn(1536, 384, generator=generator)
    kernels = {"mkl": lambda: F.linear(x, weight), "onednn": lambda: onednn_linear(x, weight, None)}
    best = dict.fromkeys(kernels, float("inf"))
    with torch.no_grad():
        for _ in range(6):  # the first round warms up (oneDNN builds its kernels on first use)
            for name, run in kernels.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
    return best["mkl"] / best["onednn"]


def onednn_available(device: torch.device) -> tuple[bool, str]:
    """Whether hfgpt routes fp32 linear layers on `device` through oneDNN, and why: where it is supported and
    measured clearly faster than MKL (`onednn_speedup`), or as $HFGPT_ONEDNN (0 or 1) says."""
    supported, why = onednn_supported(device)
    if not supported:
        return False, why
    switch = os.environ.get(ENV_SWITCH, "").strip().lower()
    if switch in ("0", "false", "no", "off"):
        return False, f"{ENV_SWITCH}={switch}"
    if switch in ("1", "true", "yes", "on"):
        return True, f"{ENV_SWITCH}={switch}"
    if switch not in ("", "auto"):
        raise ValueError(f"{ENV_SWITCH}={switch!r}: use 1 (always), 0 (never) or leave it unset (measure)")
    speedup = onednn_speedup()
    if speedup < MIN_SPEEDUP:
        return False, f"MKL's fp32 products are as fast on this CPU (oneDNN measured {speedup:.2f}x)"
    return True, f"oneDNN's fp32 products measured {speedup:.1f}x MKL's on this CPU"


# The op that compiled steps and training call. Registered through `torch.library.Library` rather than
# `torch.library.custom_op`, whose Python wrapper costs 9-10 us a call against 2-4 us here (37 calls a decoding step at
# the `small` shape). It has no autograd formula of its own: training gets its gradients from `_OneDNNLinearFunction`.
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


def _routable_linears(model: nn.Module) -> list[nn.Linear]:
    """The plain fp32 CPU `nn.Linear` layers of `model` that no enclosing block routes yet; none where oneDNN is not
    used (`onednn_available`)."""
    layers = [module for module in model.modules()
              if type(module) is nn.Linear and type(module.weight.data) is torch.Tensor  # not sharded (DTensor)
              and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32
              and "forward" not in vars(module)]
    return layers if layers and onednn_available(layers[0].weight.device)[0] else []


@contextlib.contextmanager
def _forward_replaced(layers: list[nn.Linear], forward) -> Iterator[None]:
    """`forward` bound to each of `layers` for the block; their own `forward` again after (also after an error)."""
    for layer in layers:
        layer.forward = types.MethodType(forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@contextlib.contextmanager
def onednn_linears(model: nn.Module) -> Iterator[int]:
    """Inside the block, `model`'s fp32 `nn.Linear` layers on an x86 CPU compute through oneDNN with packed copies of
    their weights (see the module docstring); yields how many layers it routed (0 where `onednn_available` says no)."""
    layers = _routable_linears(model)
    # One row (a batch-1 decoding step) only pays where the weights stream from memory: for weights that stay in the
    # cache between tokens MKL's matrix-vector product is quicker than oneDNN's per-call overhead (the `mini` preset,
    # 17 MB: 0.23 against 0.39 ms a step; `small`, 55 MB: 2.5 against 1.0 ms; bench/linear_kernels.py)
    one_row = sum(layer.weight.numel() * 4 for layer in layers) > last_level_cache_bytes()
    for layer in layers:
        layer._onednn_for_one_row = one_row
        _pack(layer)
    try:
        with _forward_replaced(layers, _linear_forward):
            yield len(layers)
    finally:
        for layer in layers:
            del layer._packed, layer._packed_version, layer._onednn_for_one_row


class _OneDNNLinearFunction(torch.autograd.Function):
    """`F.linear` with its forward and both backward products through oneDNN (weights as they are, not packed)."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return onednn_linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, weight = ctx.saved_tensors
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # grad_output @ weight, as a linear layer whose weight is weight^T
            grad_x = onednn_linear(rows, weight.t(), None).reshape(*grad_output.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:  # grad_output^T @ x
            grad_weight = onednn_linear(rows.t(), x.reshape(-1, x.shape[-1]).t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


def _training_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if _trains_through_onednn(x, self.weight, self.bias):
        return _OneDNNLinearFunction.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


@contextlib.contextmanager
def onednn_training_linears(model: nn.Module) -> Iterator[int]:
    """Inside the block, `model`'s plain fp32 `nn.Linear` layers on an x86 CPU (PEFT's LoRA layers' base and adapter
    layers included) compute forward and backward through oneDNN, with their weights as they are, whenever autocast
    is off and the product has at least `MIN_TRAINING_PRODUCT` multiply-adds; anything else (small products, bf16,
    autocast) takes the ordinary path. The layers themselves are routed, not `F.linear` calls around them, so that
    activation checkpointing's recomputation in the backward pass goes the same way. Yields how many layers it routed
    (0 where `onednn_available` says no, or where an enclosing block already routes them). The `small` shape's fp32
    training step: 1.4x eagerly, 1.7x compiled (bench/model_speed.py)."""
    layers = _routable_linears(model)
    with _forward_replaced(layers, _training_forward):
        yield len(layers)


# Smallest product (rows x in x out multiply-adds) a training step sends to oneDNN: below it oneDNN's per-call
# overhead loses to MKL or barely wins (forward + backward of one layer, 2 threads: 4.2M multiply-adds 0.81-1.01x,
# 9.4M 1.18x, 16.8M 1.32-1.59x, 151M 1.7-2.1x; the `tiny` preset's LM head at 8.4M made its step slower)
MIN_TRAINING_PRODUCT = 2**24


def _trains_through_onednn(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    plain = (torch.Tensor, nn.Parameter)
    return (type(input) in plain and type(weight) in plain and (bias is None or type(bias) in plain)
            and input.dtype == weight.dtype == torch.float32 and input.device.type == "cpu" and input.dim() >= 1
            and input.layout == weight.layout == torch.strided and weight.dim() == 2
            and not torch.is_autocast_enabled("cpu")
            and input.numel() * weight.shape[0] >= MIN_TRAINING_PRODUCT)


__all__ = ["ENV_SWITCH", "MIN_TRAINING_PRODUCT", "last_level_cache_bytes", "onednn_available",
           "onednn_linear", "onednn_linears", "onednn_speedup", "onednn_supported",
           "onednn_training_linears"]

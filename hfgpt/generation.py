"""Decoding: the one generation function hfgpt's own code calls (sample generations after pretraining, SFT/DPO
evaluation, `hfgpt eval rouge`), with a compiled decoding step on the CPU too.

transformers' `generate()` compiles its decoding step by itself only on accelerators. It will on any device when
given a static cache and a `CompileConfig` flagged for all devices, and that is all `generate` below does: the prompt
(prefill) runs eagerly, every following one-token step runs the compiled forward over a fixed-size cache, and the
tokens are those of `model.generate(...)` with the same settings (greedy or sampling, any batch size, left padding).

The compiled step is specialised to a batch size and a cache length: the cache length is rounded up to a multiple of
`CACHE_BUCKET` (at most the model's context), so prompts of different lengths reuse one compiled step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import CompileConfig

from .hardware import compiled_attention_written_out, compiler_available
from .onednn import onednn_linears

CACHE_BUCKET = 128


def compile_config() -> CompileConfig:
    """Static shapes, one graph, inductor's default mode (the library's default, "reduce-overhead", means CUDA
    graphs, which a CPU does not have)."""
    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers' switch for compiling on CPUs as well
    return config


def static_cache_length(prompt_length: int, max_new_tokens: int, context: int | None) -> int:
    """Cache slots for a prompt and its continuation, rounded up so that other lengths reuse the compiled step."""
    needed = prompt_length + max_new_tokens
    rounded = -(-needed // CACHE_BUCKET) * CACHE_BUCKET
    return max(needed, min(rounded, context)) if context else rounded


def can_compile_decoding(model) -> tuple[bool, str]:
    """Whether `generate` can use the compiled static-cache path for this model, and if not, why."""
    if not getattr(model, "_can_compile_fullgraph", False):
        return False, f"{type(model).__name__} does not declare that it compiles as one graph"
    if getattr(model, "hf_quantizer", None) is not None:
        return False, "quantised weights"
    if getattr(model, "peft_config", None):
        return False, "an unmerged PEFT adapter (merge it first)"
    from .training.sharding import is_sharded

    if is_sharded(model):
        return False, "a sharded (FSDP) model: each step gathers the weights from every process"
    return compiler_available(next(model.parameters()).device)


def compiled_by_default(model) -> bool:
    """Compiled decoding pays where a decoding step is dominated by per-operation overhead: kernel launches on a GPU,
    and on a CPU once the weights are int8 (`hfgpt.quantization`: 14 MB at the `small` shape, read from cache, so
    Python and dispatch are what is left; 4.1-4.4x GPT-2's generate() compiled against 2.4-2.6x eager at batch 1). An
    fp32 model on a CPU gains only 4-9% from it (oneDNN linears: 1.32x GPT-2's generate() eager, 1.38x compiled at
    batch 1; 1.97x / 2.14x at batch 4; bench/model_speed.py), less than compiling costs a short run, so there it is
    opt-in."""
    if not can_compile_decoding(model)[0]:
        return False
    from .quantization import has_int8_weights

    return next(model.parameters()).device.type != "cpu" or has_int8_weights(model)


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, compiled: bool | None = None,
             **generate_kwargs) -> torch.Tensor:
    """`model.generate(input_ids, attention_mask=..., **generate_kwargs)`, decoding with a compiled step over a static
    cache when `compiled` (default: `compiled_by_default`). The first call for a batch size and cache length compiles
    (tens of seconds on a CPU); later calls reuse it."""
    if compiled is None:
        compiled = compiled_by_default(model)
    if compiled:
        max_new_tokens = generate_kwargs.get("max_new_tokens") or model.generation_config.max_new_tokens or 20
        context = getattr(model.config, "max_position_embeddings", None)
        cache_length = static_cache_length(input_ids.shape[1], max_new_tokens, context)
        generate_kwargs.update(cache_implementation="static", max_cache_len=cache_length,
                               compile_config=compile_config())
    # fp32 matmuls at twice MKL's speed on x86 CPUs (hfgpt.onednn); no-op elsewhere
    with onednn_linears(model), _attention_for_compiled_cpu_decoding(model, compiled):
        return model.generate(input_ids, attention_mask=attention_mask, **generate_kwargs)


@contextlib.contextmanager
def _attention_for_compiled_cpu_decoding(model, compiled: bool) -> Iterator[None]:
    """Attention written out for a compiled decoding step where it decodes faster (`compiled_attention_written_out`:
    on a CPU; the same tokens), the model's own restored after."""
    if not compiled or not compiled_attention_written_out(model, model.device):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


__all__ = ["CACHE_BUCKET", "can_compile_decoding", "compile_config", "compiled_by_default", "generate",
           "static_cache_length"]

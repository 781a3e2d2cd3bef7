"""What the hardware at hand does well: native bf16 arithmetic, a compiler for torch.compile's kernels, and which
attention a compiled model should use there.

Training (bf16 and compile defaults) and decoding (the compiled generation step) ask here."""

from __future__ import annotations

import shutil
import sys

import torch


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes bf16 matrix products in hardware (fast) rather than by emulation, and why."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major >= 8:
            return True, f"{name} (compute capability {major}.{minor}) has bf16 tensor cores"
        return False, f"{name} (compute capability {major}.{minor} < 8.0) has no bf16 tensor cores"
    if device.type == "cpu":
        capability = torch._C._cpu._get_cpu_capability()  # the CPU flags torch itself dispatches on
        found = [flag for flag in ("amx_bf16", "avx512_bf16") if capability.get(flag)]
        if found:
            return True, f"this CPU has {found[0].upper().replace('_', '-')}"
        return False, "this CPU has neither AVX512-BF16 nor AMX: bf16 is emulated there and slower than fp32"
    return False, f"hfgpt does not know whether {device.type} computes bf16 fast"


def compiler_available(device: torch.device) -> tuple[bool, str]:
    """torch.compile's default backend (inductor) writes C++ kernels on a CPU and Triton kernels on a GPU."""
    if sys.platform == "win32":
        return False, "torch.compile is not supported on Windows here"
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return False, "no C++ compiler (g++ or clang++) for inductor's CPU kernels"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "Triton is not installed"
    return True, "inductor is available"


def compiled_attention_written_out(model, device: torch.device) -> bool:
    """Whether a compiled `model` on `device` should attend with attention written out (`eager`: matrix products and a
    softmax, which inductor fuses) rather than its sdpa: on a CPU, where sdpa's kernel is opaque to the compiler.
    Training: its flash kernel's backward is slow (the `small` shape in bf16: 3,108 against 2,683 tokens/s on one
    thread; 2,162 against 1,773 at context 1024); decoding: it reads the whole static cache with a mask (batch 4:
    1,093-1,145 against 973-1,023 tokens/s). On GPUs sdpa's kernels win."""
    return device.type == "cpu" and model.config._attn_implementation == "sdpa"


__all__ = ["compiled_attention_written_out", "compiler_available", "native_bf16"]

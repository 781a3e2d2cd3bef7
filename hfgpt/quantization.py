"""int8 weights for decoding: every linear layer's weight stored as int8 with one scale per output row.

Why: decoding one token multiplies each weight matrix by one vector, so a step reads every weight once and does
almost no arithmetic with it; its speed is the speed at which the weights reach the cores. The `small` shape's linear
layers are 55 MB in fp32, 28 MB in bf16 and 14 MB in int8, which is small enough to stay in this machine's 32 MB L3
cache between tokens (bench/model_speed.py measures what that buys). This is weight-only quantization, as llama.cpp's
q8_0 and gpt-fast's int8 mode do it: activations stay in 16-bit floats, only the stored weights are rounded.
`hfgpt chat --quantize int8` and `hfgpt eval ... --quantize int8` decode this way.

    w_int8[n, k] = round(w[n, k] / scale[n]),  scale[n] = max_k |w[n, k]| / 127
    y = (x @ w_int8.T) * scale + bias          (torch._weight_int8pack_mm in bf16, the bias in x's dtype)

The rounding error of a weight is at most scale[n] / 2 (0.4% of the row's largest weight). It changes logits slightly,
so greedy tokens can differ from the fp32 model's where two candidates are nearly tied; `hfgpt eval perplexity
--quantize int8` and bench/quantization.py measure what it costs a trained model. For decoding and evaluation only:
the int8 layers have no gradients, and asking for their weights (`state_dict`, `save_pretrained`) raises
`QuantizedSaveError` rather than writing a checkpoint that would load back with random weights.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZE_CHOICES = ("int8",)
COMPUTE_DTYPE = torch.bfloat16  # the int8 kernel's fast path on CPUs (its fp32 path is ~10x slower) and on GPUs


class Int8Linear(nn.Module):
    """An `nn.Linear` whose weight is stored as int8 rows with a scale each (see the module docstring)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        # the kernel takes the scales in the activations' dtype: round them first, then the weights against them
        scale = (weight.abs().amax(dim=1) / 127.0).to(COMPUTE_DTYPE)
        scale = scale.masked_fill(scale == 0, 1.0)  # an all-zero row stays zero
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8",
                             torch.round(weight / scale.float()[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_state_dict_post_hook(_refuse_saving)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        # back to the input's dtype before the bias: an element-wise op in bf16 rounds differently eagerly and
        # compiled (inductor computes it in fp32), which would add to what the two decoding paths differ by
        y = torch._weight_int8pack_mm(rows, self.weight_int8, self.weight_scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer computes with, in fp32 (for checking the rounding)."""
        return self.weight_int8.float() * self.weight_scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class QuantizedSaveError(RuntimeError):
    """A model with int8 decoding layers was asked for its weights (to save them)."""


def _refuse_saving(module, state_dict, prefix, local_metadata) -> None:
    # int8 buffers are not transformers' weight names: saved, they would load back as missing (random) weights
    raise QuantizedSaveError(
        "This model's linear layers were quantised to int8 for decoding (hfgpt.quantization); their weights cannot "
        "be saved or exported in that form. Save or export the full-precision model (load it again without "
        "--quantize); for small files to run elsewhere, `hfgpt export --to gguf --dtype q8_0` writes 8-bit weights "
        "that llama.cpp reads.")


def has_int8_weights(model: nn.Module) -> bool:
    """Whether `quantize_int8` has replaced the model's linear layers."""
    return any(isinstance(module, Int8Linear) for module in model.modules())


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of `model` (the output head included) by an `Int8Linear`, in place; returns the model
    in eval mode. Any causal LM built from `nn.Linear` works (hfgpt, an exported Llama); models with GPT-2's `Conv1D`
    layers are refused."""
    if getattr(model, "peft_config", None):
        raise ValueError("This model carries PEFT adapters; merge them first (`model.merge_and_unload()`), then "
                         "quantize the merged model.")
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError("This model is already quantised (it was loaded with a quantization_config); load it in "
                         "full precision to quantize it to int8.")
    if has_int8_weights(model):
        raise ValueError("This model's linear layers are already int8.")
    conv1d = [name for name, module in model.named_modules() if type(module).__name__ == "Conv1D"]
    if conv1d:  # transformers' GPT-2 family: a Conv1D is a transposed linear layer, left in fp32 it would halve the gain
        raise ValueError(f"{type(model).__name__} computes with GPT-2's Conv1D layers ({conv1d[0]}, ...), which int8 "
                         "quantization does not cover; convert it to hfgpt first (`hfgpt convert --from gpt2`).")
    targets = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize.")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(linear))  # its buffers are made on the weight's device
    return model.eval()


def quantize(model: nn.Module, method: str | None) -> nn.Module:
    """`--quantize METHOD` of the commands that load a model to generate or evaluate (None: unchanged)."""
    if method is None:
        return model
    if method not in QUANTIZE_CHOICES:
        raise ValueError(f"Unknown quantization {method!r}; choose one of {', '.join(QUANTIZE_CHOICES)}.")
    return quantize_int8(model)


__all__ = ["COMPUTE_DTYPE", "Int8Linear", "QUANTIZE_CHOICES", "QuantizedSaveError", "has_int8_weights", "quantize",
           "quantize_int8"]

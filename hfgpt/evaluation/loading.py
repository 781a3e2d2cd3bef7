"""Loading what an evaluation needs: a model and its tokenizer, with clear errors (data files: `hfgpt.files`)."""

import os
from pathlib import Path

import torch

from ..files import TOKENIZER_FILES


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` picks the best available accelerator, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs):
    """`AutoTokenizer.from_pretrained`, with a clear error for a local model directory saved without its tokenizer."""
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)} found). Save the tokenizer next to the "
            f"model with `tokenizer.save_pretrained('{path}')`, or pass a tokenizer explicitly "
            "(`tokenizer=` / `--tokenizer_name_or_path`)."
        )
    return AutoTokenizer.from_pretrained(name_or_path, **kwargs)


def load_model(name_or_path: str | os.PathLike, auto_class=None, device=None, dtype=None, trust_remote_code=False,
               quantize: str | None = None):
    """Load a model for evaluation (eval mode, on `device`), its weights quantised if `quantize` ("int8",
    `hfgpt.quantization`). hfgpt models need no remote code: importing hfgpt registers them with the Auto classes."""
    import transformers

    import hfgpt  # noqa: F401  (registers the hfgpt Auto classes)

    auto_class = auto_class or transformers.AutoModelForCausalLM
    path = Path(name_or_path)
    if path.exists() and not (path / transformers.utils.CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{path} is not a model directory: it has no {transformers.utils.CONFIG_NAME}. Pass the output directory "
            "of a training run (or a Hub model id)."
        )
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    from ..quantization import quantize as quantize_weights

    model = auto_class.from_pretrained(name_or_path, **kwargs)
    return quantize_weights(model.to(resolve_device(device)), quantize).eval()

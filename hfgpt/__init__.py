"""hfgpt: a GPT written from scratch in PyTorch, shipped as a native Hugging Face transformers model."""

from .configuration_hfgpt import HFGPTConfig

__version__ = "0.1.0"
__all__ = ["HFGPTConfig"]

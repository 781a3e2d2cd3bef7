"""hfgpt: a GPT written from scratch in PyTorch, shipped as a native Hugging Face transformers model.

Importing hfgpt registers the config, the base model and the four heads with the Auto classes, and marks them so that
`save_pretrained` copies the modelling code next to the weights (for `trust_remote_code=True` where hfgpt is not
installed).
"""

import logging


class _KnownHarmlessWarnings(logging.Filter):
    """Drops the warnings bitsandbytes and `kernels` print whenever bitsandbytes is imported, offline: its optional
    faster CPU 4-bit kernel cannot be fetched from the Hub, and so is not trusted. bitsandbytes is imported by
    transformers' Trainer through PEFT, whether or not any weight is 4-bit, and a user reads these lines as breakage.
    Only these two messages go; every other warning of these loggers still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
                    or message.startswith("Skipping publisher trust check for 'kernels-community/quantization-"))


for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).addFilter(_KnownHarmlessWarnings())

from transformers import (  # noqa: E402 (the filter must be in place before anything imports bitsandbytes)
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_hfgpt import HFGPTConfig  # noqa: E402
from .modeling_hfgpt import (  # noqa: E402
    HFGPTForCausalLM,
    HFGPTForQuestionAnswering,
    HFGPTForSequenceClassification,
    HFGPTForTokenClassification,
    HFGPTModel,
    HFGPTPreTrainedModel,
)

__version__ = "0.1.0"

_AUTO_CLASSES = {
    AutoModel: HFGPTModel,
    AutoModelForCausalLM: HFGPTForCausalLM,
    AutoModelForSequenceClassification: HFGPTForSequenceClassification,
    AutoModelForTokenClassification: HFGPTForTokenClassification,
    AutoModelForQuestionAnswering: HFGPTForQuestionAnswering,
}

AutoConfig.register(HFGPTConfig.model_type, HFGPTConfig, exist_ok=True)
HFGPTConfig.register_for_auto_class()
for auto_class, model_class in _AUTO_CLASSES.items():
    auto_class.register(HFGPTConfig, model_class, exist_ok=True)
    model_class.register_for_auto_class(auto_class.__name__)

__all__ = [
    "HFGPTConfig",
    "HFGPTPreTrainedModel",
    "HFGPTModel",
    "HFGPTForCausalLM",
    "HFGPTForSequenceClassification",
    "HFGPTForTokenClassification",
    "HFGPTForQuestionAnswering",
]

"""hfgpt: a GPT written from scratch in PyTorch, shipped as a native Hugging Face transformers model.

Importing hfgpt registers the config, the base model and the four heads with the Auto classes, and marks them so that
`save_pretrained` copies the modelling code next to the weights (for `trust_remote_code=True` where hfgpt is not
installed).
"""

from . import quiet

quiet.install()  # before anything imports bitsandbytes or transformers' Trainer

from transformers import (  # noqa: E402 (quiet.install() first)
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

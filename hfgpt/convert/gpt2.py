"""GPT-2 (transformers' `GPT2LMHeadModel`) <-> hfgpt (`HFGPTForCausalLM`), both ways, exactly.

The two models compute the same function when hfgpt is configured like GPT-2 (learned positions, LayerNorm, pre-norm,
biases, one key/value head per query head). Only the weight layout differs:

    GPT-2                                  hfgpt
    h.{i}.attn.c_attn   Conv1D (in, 3*out)  h.{i}.attn.{q,k,v}_proj   nn.Linear (out, in) each
    h.{i}.attn.c_proj   Conv1D (in, out)    h.{i}.attn.o_proj         nn.Linear (out, in)
    h.{i}.mlp.c_fc      Conv1D (in, out)    h.{i}.mlp.up_proj         nn.Linear (out, in)
    h.{i}.mlp.c_proj    Conv1D (in, out)    h.{i}.mlp.down_proj       nn.Linear (out, in)
    wte, wpe, h.{i}.ln_1, h.{i}.ln_2, ln_f, lm_head: same names, same layout

A Conv1D computes x @ W + b, an nn.Linear x @ W.T + b, so every Conv1D weight is transposed on the way.

Anything one side has and the other cannot express (GPT-2's layer-index attention scaling, hfgpt's RoPE or GQA, ...)
is refused with an error naming the setting, never converted approximately.
"""

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel, PreTrainedModel
from transformers.utils.hub import cached_file

from ..configuration_hfgpt import HFGPTConfig
from ..modeling_hfgpt import HFGPTForCausalLM

logger = logging.getLogger(__name__)

# GPT-2 `activation_function` -> hfgpt `hidden_act`. "gelu_pytorch_tanh" is the same tanh approximation as "gelu_new"
# (torch's fused kernel), so it maps there.
GPT2_TO_HFGPT_ACTIVATION = {"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu", "gelu_pytorch_tanh": "gelu_new"}
HFGPT_TO_GPT2_ACTIVATION = {"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu"}

# Conv1D layers of a GPT-2 block and the nn.Linear that replaces each. `attn.c_attn` is fused and handled apart.
CONV1D_TO_LINEAR = {"attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
FUSED_QKV = "attn.c_attn"
QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")
# Tensors with the same name and layout in both models (per block, then outside the blocks).
SHARED_BLOCK_TENSORS = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")
SHARED_TENSORS = ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                  "transformer.ln_f.bias", "lm_head.weight")

# Tokenizer files copied from the source to the converted directory when the source has them (GPT-2's slow-tokenizer
# vocab.json/merges.txt, the fast tokenizer.json, and the configuration files around them).
TOKENIZER_FILES_TO_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja")


# ---------------------------------------------------------------------------------------------------------------------
# Configs


def hfgpt_config_from_gpt2(config: GPT2Config) -> HFGPTConfig:
    """The hfgpt config computing the same function as this GPT-2 config, or a ValueError naming what hfgpt lacks."""
    unsupported = {
        "scale_attn_by_inverse_layer_idx": (True, "scales attention scores by 1/(layer index + 1)"),
        "reorder_and_upcast_attn": (True, "reorders and upcasts the attention product"),
        "scale_attn_weights": (False, "leaves attention scores unscaled instead of dividing by sqrt(head_dim)"),
        "add_cross_attention": (True, "adds cross-attention to an encoder"),
    }
    for name, (value, what) in unsupported.items():
        if getattr(config, name, not value) == value:
            raise ValueError(
                f"This GPT-2 checkpoint has {name}={value}, which {what}; hfgpt has no such option, so the converted "
                f"model would compute something else. Only GPT-2 checkpoints with {name}={not value} can be converted."
            )
    if config.activation_function not in GPT2_TO_HFGPT_ACTIVATION:
        raise ValueError(
            f"GPT-2 activation_function={config.activation_function!r} has no hfgpt equivalent; convertible "
            f"activations: {', '.join(map(repr, GPT2_TO_HFGPT_ACTIVATION))}."
        )
    return HFGPTConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        intermediate_size=config.n_inner,  # None: 4 * hidden_size, GPT-2's default too
        max_position_embeddings=config.n_positions,
        position_embedding_type="learned",
        norm_type="layernorm",
        norm_position="pre",
        norm_eps=config.layer_norm_epsilon,
        hidden_act=GPT2_TO_HFGPT_ACTIVATION[config.activation_function],
        bias=True,
        embedding_dropout=config.embd_pdrop,
        attention_dropout=config.attn_pdrop,
        residual_dropout=config.resid_pdrop,
        initializer_range=config.initializer_range,
        use_cache=config.use_cache,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def gpt2_config_from_hfgpt(config: HFGPTConfig) -> GPT2Config:
    """The GPT-2 config computing the same function as this hfgpt config, or a ValueError naming the switch GPT-2
    cannot express."""
    required = {
        "position_embedding_type": "learned",
        "norm_type": "layernorm",
        "norm_position": "pre",
        "bias": True,
        "num_key_value_heads": config.num_attention_heads,
    }
    for name, value in required.items():
        if getattr(config, name) != value:
            raise ValueError(
                f"This hfgpt model has {name}={getattr(config, name)!r}, which GPT-2 cannot represent; only models "
                f"with {name}={value!r} convert to GPT-2 (GPT-2 has learned positions, pre-norm LayerNorm, biases "
                "and one key/value head per attention head)."
            )
    if config.hidden_act not in HFGPT_TO_GPT2_ACTIVATION:
        raise ValueError(
            f"This hfgpt model has hidden_act={config.hidden_act!r}, which GPT-2 cannot represent; convertible "
            f"activations: {', '.join(map(repr, HFGPT_TO_GPT2_ACTIVATION))}."
        )
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_embd=config.hidden_size,
        n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads,
        n_inner=None if config.intermediate_size == 4 * config.hidden_size else config.intermediate_size,
        n_positions=config.max_position_embeddings,
        activation_function=HFGPT_TO_GPT2_ACTIVATION[config.hidden_act],
        layer_norm_epsilon=config.norm_eps,
        embd_pdrop=config.embedding_dropout,
        attn_pdrop=config.attention_dropout,
        resid_pdrop=config.residual_dropout,
        initializer_range=config.initializer_range,
        use_cache=config.use_cache,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Weights


def _take(state_dict: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in state_dict:
        raise ValueError(f"The checkpoint has no tensor {name!r}; it is not a complete GPT-2 language model.")
    return state_dict.pop(name)


def _check_all_used(state_dict: dict[str, torch.Tensor], source: str) -> None:
    if state_dict:
        raise ValueError(
            f"The {source} checkpoint has tensors the conversion does not know ({', '.join(sorted(state_dict)[:5])}"
            f"{', ...' if len(state_dict) > 5 else ''}); refusing to drop them silently."
        )


def hfgpt_state_dict_from_gpt2(gpt2_state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Rename GPT-2 tensors to hfgpt's, splitting the fused q/k/v and transposing every Conv1D weight."""
    source = dict(gpt2_state_dict)
    converted = {name: _take(source, name) for name in SHARED_TENSORS}
    for i in range(num_layers):
        prefix = f"transformer.h.{i}."
        for name in SHARED_BLOCK_TENSORS:
            converted[prefix + name] = _take(source, prefix + name)
        fused_weight = _take(source, f"{prefix}{FUSED_QKV}.weight").t()  # (3 * out, in): q, k, v stacked by rows
        fused_bias = _take(source, f"{prefix}{FUSED_QKV}.bias")
        for linear, weight, bias in zip(QKV, fused_weight.chunk(3, dim=0), fused_bias.chunk(3, dim=0)):
            converted[f"{prefix}{linear}.weight"] = weight.contiguous()
            converted[f"{prefix}{linear}.bias"] = bias.contiguous()
        for conv1d, linear in CONV1D_TO_LINEAR.items():
            converted[f"{prefix}{linear}.weight"] = _take(source, f"{prefix}{conv1d}.weight").t().contiguous()
            converted[f"{prefix}{linear}.bias"] = _take(source, f"{prefix}{conv1d}.bias")
    _check_all_used(source, "GPT-2")
    return converted


def gpt2_state_dict_from_hfgpt(hfgpt_state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The inverse of `hfgpt_state_dict_from_gpt2`: fuse q/k/v into c_attn and transpose back to Conv1D layout."""
    source = dict(hfgpt_state_dict)
    converted = {name: _take(source, name) for name in SHARED_TENSORS}
    for i in range(num_layers):
        prefix = f"transformer.h.{i}."
        for name in SHARED_BLOCK_TENSORS:
            converted[prefix + name] = _take(source, prefix + name)
        weights = [_take(source, f"{prefix}{linear}.weight") for linear in QKV]
        biases = [_take(source, f"{prefix}{linear}.bias") for linear in QKV]
        converted[f"{prefix}{FUSED_QKV}.weight"] = torch.cat(weights, dim=0).t().contiguous()
        converted[f"{prefix}{FUSED_QKV}.bias"] = torch.cat(biases, dim=0)
        for conv1d, linear in CONV1D_TO_LINEAR.items():
            converted[f"{prefix}{conv1d}.weight"] = _take(source, f"{prefix}{linear}.weight").t().contiguous()
            converted[f"{prefix}{conv1d}.bias"] = _take(source, f"{prefix}{linear}.bias")
    _check_all_used(source, "hfgpt")
    return converted


# ---------------------------------------------------------------------------------------------------------------------
# Directories


def _load_source_config(source: str, expected_model_type: str, other_direction: str):
    """The source's config, checked to be of the expected model type before any weight is read."""
    config = AutoConfig.from_pretrained(source)
    if config.model_type != expected_model_type:
        raise ValueError(
            f"{source} holds a {config.model_type!r} model, but this conversion reads {expected_model_type!r} models. "
            f"{other_direction}"
        )
    return config


def _load_source(model_class: type[PreTrainedModel], source: str) -> PreTrainedModel:
    """Load through from_pretrained (a local directory or a Hub id), from safetensors only, failing on missing
    weights rather than converting freshly initialised ones."""
    model, info = model_class.from_pretrained(source, use_safetensors=True, output_loading_info=True)
    if info["missing_keys"]:
        raise ValueError(
            f"{source} lacks weights of a {model_class.__name__} ({', '.join(sorted(info['missing_keys'])[:5])}); "
            "convert a checkpoint saved from the causal language model, not from another head."
        )
    return model.eval()


def _build_target(model_class: type[PreTrainedModel], config, state_dict: dict[str, torch.Tensor]) -> PreTrainedModel:
    """The target model holding exactly these tensors (their dtype too), without initialising weights to be replaced."""
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()
    still_empty = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if still_empty:
        raise RuntimeError(f"Conversion left tensors without values: {still_empty}")
    return model.eval()


def _copy_tokenizer_files(source: str, output: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES_TO_COPY:
        path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        if path is not None:
            shutil.copyfile(path, output / name)
            copied.append(name)
    if not copied:
        logger.warning("%s has no tokenizer files; the converted model comes without a tokenizer.", source)
    return copied


def _save(model: PreTrainedModel, source: str, output_dir: str | os.PathLike) -> Path:
    """Write the model (and the source's tokenizer files) to output_dir. Everything is written to a temporary
    sibling directory first and renamed at the end, so output_dir is either complete or absent."""
    output = Path(output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} already exists and is not an empty directory; choose a new output directory.")
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        model.save_pretrained(partial)
        _copy_tokenizer_files(source, partial)
        os.replace(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return output


def gpt2_to_hfgpt(source_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Convert a GPT-2 checkpoint (a local `GPT2LMHeadModel` directory or a Hub id such as `openai-community/gpt2`)
    into a complete hfgpt directory (safetensors, config with auto_map, modelling code, tokenizer files if any).
    Returns the output directory."""
    source = str(source_dir)
    gpt2_config = _load_source_config(source, "gpt2", "To convert hfgpt to GPT-2, use hfgpt_to_gpt2 (--from hfgpt).")
    config = hfgpt_config_from_gpt2(gpt2_config)  # refuse unsupported options before reading any weight
    gpt2 = _load_source(GPT2LMHeadModel, source)
    state_dict = hfgpt_state_dict_from_gpt2(gpt2.state_dict(), config.num_hidden_layers)
    model = _build_target(HFGPTForCausalLM, config, state_dict)
    model.generation_config = gpt2.generation_config  # generation defaults are model-agnostic: keep the source's
    return _save(model, source, output_dir)


def hfgpt_to_gpt2(source_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Convert an hfgpt checkpoint (local directory or Hub id) whose architecture GPT-2 can express into a
    transformers `GPT2LMHeadModel` directory. Returns the output directory."""
    source = str(source_dir)
    hfgpt_config = _load_source_config(source, "hfgpt", "To convert GPT-2 to hfgpt, use gpt2_to_hfgpt (--from gpt2).")
    config = gpt2_config_from_hfgpt(hfgpt_config)
    hfgpt = _load_source(HFGPTForCausalLM, source)
    state_dict = gpt2_state_dict_from_hfgpt(hfgpt.state_dict(), config.n_layer)
    model = _build_target(GPT2LMHeadModel, config, state_dict)
    model.generation_config = hfgpt.generation_config
    return _save(model, source, output_dir)

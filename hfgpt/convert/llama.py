"""hfgpt -> transformers' `LlamaForCausalLM`, exactly (same logits).

hfgpt configured with RoPE, RMSNorm, pre-norm and a SwiGLU MLP (the `modern` presets) is a Llama in all but names:

    hfgpt                                   Llama
    transformer.wte                         model.embed_tokens
    transformer.h.{i}.ln_1                  model.layers.{i}.input_layernorm
    transformer.h.{i}.attn.{q,k,v,o}_proj   model.layers.{i}.self_attn.{q,k,v,o}_proj
    transformer.h.{i}.ln_2                  model.layers.{i}.post_attention_layernorm
    transformer.h.{i}.mlp.{gate,up,down}_proj  model.layers.{i}.mlp.{gate,up,down}_proj
    transformer.ln_f                        model.norm
    lm_head                                 lm_head

Both rotate queries and keys the same way (transformers' rotate_half convention, inverse frequencies
theta^(-2i/head_dim), or a RoPE scaling through the same transformers functions), so no tensor changes, only its
name. What Llama has flags for is mapped (biases, tied embeddings, the RoPE parameters, grouped-query attention, the
norm epsilon); anything else is refused with the switch named.
Dropout probabilities other than attention's have no Llama field; they only act in training, so they are not carried.
"""

import os
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ..configuration_hfgpt import HFGPTConfig
from ..modeling_hfgpt import HFGPTForCausalLM
from .gpt2 import _load_source, _load_source_config, _save

# switch -> the value a Llama has. Checked in this order, so the error names the first difference.
LLAMA_SHAPE = {
    "position_embedding_type": "rope",
    "norm_type": "rmsnorm",
    "norm_position": "pre",
    "hidden_act": "swiglu",
}

# hfgpt tensor name (after "transformer.h.{i}.") -> Llama's (after "model.layers.{i}.")
BLOCK_NAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}_proj.{t}": f"self_attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")},
    **{f"mlp.{p}_proj.{t}": f"mlp.{p}_proj.{t}" for p in ("gate", "up", "down") for t in ("weight", "bias")},
}
TOP_NAMES = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}


def check_llama_shape(config: HFGPTConfig) -> None:
    """Raise a ValueError naming the first switch a Llama cannot express, and what to do instead."""
    for name, value in LLAMA_SHAPE.items():
        if getattr(config, name) != value:
            gpt2_like = config.position_embedding_type == "learned" and config.norm_type == "layernorm"
            instead = ("; this model is GPT-2 shaped: export it with --to gpt2" if gpt2_like
                       else "; no export target holds this combination")
            raise ValueError(
                f"This hfgpt model has {name}={getattr(config, name)!r}, which Llama cannot express (Llama needs "
                f"{name}={value!r}, like the 'modern' presets){instead}."
            )


def rope_parameters(config: HFGPTConfig) -> dict:
    """transformers' RoPE dict. hfgpt computes its frequencies with transformers' RoPE functions, as Llama does, so
    the same dict (plain RoPE, or a scaling such as linear, dynamic, yarn, llama3) means the same rotation."""
    params = getattr(config, "rope_parameters", None)  # configs from before RoPE scaling have rope_theta only
    return dict(params) if params else {"rope_type": "default", "rope_theta": config.rope_theta}


def llama_config_from_hfgpt(config: HFGPTConfig) -> LlamaConfig:
    """The Llama config computing the same function as this hfgpt config, or a ValueError naming the switch."""
    check_llama_shape(config)
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act="silu",  # Llama's MLP is always gated: down(act(gate(x)) * up(x)), i.e. SwiGLU with silu
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.norm_eps,
        use_cache=config.use_cache,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=rope_parameters(config),
        attention_bias=config.bias,  # hfgpt's one `bias` switch covers q/k/v/o and the MLP alike
        mlp_bias=config.bias,
        attention_dropout=config.attention_dropout,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def llama_state_dict_from_hfgpt(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Rename every tensor; refuse any tensor the mapping does not know rather than dropping it."""
    names = dict(TOP_NAMES)
    for i in range(num_layers):
        names.update({f"transformer.h.{i}.{k}": f"model.layers.{i}.{v}" for k, v in BLOCK_NAMES.items()})
    unknown = sorted(set(state_dict) - set(names))
    if unknown:
        raise ValueError(f"The hfgpt checkpoint has tensors the Llama export does not know ({', '.join(unknown[:5])}).")
    return {names[name]: tensor for name, tensor in state_dict.items()}


def build_llama(config: LlamaConfig, state_dict: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """A Llama holding exactly these tensors, built on the meta device so no weight is initialised only to be
    replaced. Its rotary tables are buffers, not weights: they are computed for real."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()
    still_empty = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if still_empty:
        raise RuntimeError(f"Conversion left tensors without values: {still_empty}")
    return model.eval()


def hfgpt_to_llama(source_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Convert a Llama-shaped hfgpt directory into a transformers `LlamaForCausalLM` directory (safetensors, config,
    generation config, the source's tokenizer files and chat template). Returns the output directory."""
    source = str(source_dir)
    config = llama_config_from_hfgpt(_load_source_config(source, "hfgpt", "Only hfgpt models export to Llama."))
    hfgpt = _load_source(HFGPTForCausalLM, source)
    model = build_llama(config, llama_state_dict_from_hfgpt(hfgpt.state_dict(), config.num_hidden_layers))
    model.generation_config = hfgpt.generation_config
    return _save(model, source, output_dir)

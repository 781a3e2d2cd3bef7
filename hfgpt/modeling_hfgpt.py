"""The hfgpt model: a GPT decoder written from scratch, as a native transformers model.

Reading order: positions (learned / sinusoidal / rotary) -> norms -> attention -> MLP -> block -> HFGPTModel (the
stack) -> the heads (causal LM, sequence classification, token classification, extractive question answering).

This file imports only torch, transformers and its own config, so that `save_pretrained` can ship it unchanged as
remote code (`trust_remote_code=True`) for machines where hfgpt is not installed.
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_hfgpt import HFGPTConfig

# ---------------------------------------------------------------------------------------------------------------------
# Positions


def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed position table of 'Attention Is All You Need': sin on even channels, cos on odd ones."""
    position = torch.arange(num_positions, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_positions, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


class HFGPTSinusoidalPositions(nn.Module):
    """Adds nothing learnable: looks positions up in a fixed table (a non-persistent buffer, rebuilt at init)."""

    def __init__(self, config: HFGPTConfig):
        super().__init__()
        self.num_positions, self.dim = config.max_position_embeddings, config.hidden_size
        self.register_buffer("table", sinusoidal_table(self.num_positions, self.dim), persistent=False)

    def forward(self, position_ids: torch.LongTensor) -> torch.Tensor:
        return F.embedding(position_ids, self.table)


class HFGPTRotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., 2021): returns the cos/sin that rotate queries and keys by position.

    The frequencies come from `config.rope_parameters` through transformers' RoPE functions, as in Llama: "default"
    is plain RoPE; "linear", "dynamic" (NTK), "yarn" and "llama3" rescale them to run past the trained context.
    """

    def __init__(self, config: HFGPTConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        # dynamic_rope_update reads these: the context the model was trained for, and how far the table now reaches
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        if self.rope_type == "default":
            inv_freq, self.attention_scaling = self.compute_default_rope_parameters(config)
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: HFGPTConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        """theta^(-2i/d) for the d/2 rotated pairs of each head; no scaling of cos/sin (factor 1)."""
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
        return 1.0 / (config.rope_parameters["rope_theta"] ** exponents), 1.0

    @torch.no_grad()
    @dynamic_rope_update  # "dynamic" recomputes the frequencies once positions pass the trained context
    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (batch, seq, head_dim / 2)
        angles = torch.cat((freqs, freqs), dim=-1)
        # attention_scaling is YaRN's temperature on the attention logits (1 for the other types)
        return (angles.cos() * self.attention_scaling).to(x.dtype), (angles.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ---------------------------------------------------------------------------------------------------------------------
# Norms


class HFGPTRMSNorm(nn.Module):
    """RMSNorm (Zhang and Sennrich, 2019): scale by the root mean square, no centring, no bias."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # the mean of squares overflows in half precision
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: HFGPTConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return HFGPTRMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.bias)


# ---------------------------------------------------------------------------------------------------------------------
# Attention


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim): each kv head serves n_rep query heads."""
    if n_rep == 1:
        return x
    batch, kv_heads, seq, dim = x.shape
    return x[:, :, None].expand(batch, kv_heads, n_rep, seq, dim).reshape(batch, kv_heads * n_rep, seq, dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out: softmax(q k^T * scale + mask) v. The reference the fused kernels must agree with."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:  # additive mask from create_causal_mask: 0 where allowed, -inf-ish elsewhere
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (batch, seq, heads, head_dim)
    return output, weights


class HFGPTAttention(nn.Module):
    """Causal self-attention with optional grouped-query attention (num_key_value_heads < num_attention_heads).

    The kernel (eager, sdpa, flash, flex...) is chosen by `config._attn_implementation` through transformers'
    attention interface; every kernel sees the same (batch, heads, seq, head_dim) tensors and mask.
    """

    def __init__(self, config: HFGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx  # which slot of the KV cache is ours
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        heads_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(heads_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(heads_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(heads_shape).transpose(1, 2)

        if position_embeddings is not None:  # rotary: positions enter by rotating q and k, not the residual stream
            query, key = apply_rotary(query, key, *position_embeddings)
        if cache is not None:  # append this step's keys/values, get back the whole history
            key, value = cache.update(key, value, self.layer_idx)

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(output.reshape(*input_shape, -1)), weights


# ---------------------------------------------------------------------------------------------------------------------
# MLP


class HFGPTMLP(nn.Module):
    """Position-wise feed-forward: down(act(up(x))), or with SwiGLU (Shazeer, 2020) down(silu(gate(x)) * up(x))."""

    def __init__(self, config: HFGPTConfig):
        super().__init__()
        self.gated = config.hidden_act == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)
        self.act = ACT2FN["silu" if self.gated else config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class HFGPTSparseMoeBlock(nn.Module):
    """A sparse mixture of experts in place of the MLP (Switch Transformer; Mixtral's routing): a linear router scores
    `num_experts` experts for every token, the top `num_experts_per_tok` are kept, their softmax probabilities
    renormalised to sum to 1, and the token's output is the weighted sum of those experts' outputs. Each expert is the
    block's usual MLP (HFGPTMLP), so `hidden_act` (SwiGLU included) applies to all of them.

    Dispatch loops over the experts, never over tokens: each expert runs once on the rows routed to it (gathered by
    index) and adds its weighted output back with index_add_, as transformers' MoE models do. Under torch.compile the
    gather is replaced by running every expert on every token with weight 0 where it was not chosen: the same result,
    with the static shapes a single graph needs. Returns (output, router_logits); the router logits
    (batch * seq, num_experts) feed the load-balancing loss and `output_router_logits`.
    """

    def __init__(self, config: HFGPTConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(HFGPTMLP(config) for _ in range(config.num_experts))

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, num_experts) logits -> the chosen experts' weights (renormalised softmax) and indices, (tokens, k)."""
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), indices

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        router_logits = self.gate(x)
        weights, indices = self.route(router_logits)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        if torch.compiler.is_compiling():
            # static shapes: every expert on every token; dense_weights[t, e] is 0 unless expert e was chosen for t
            dense_weights = torch.zeros_like(router_logits, dtype=x.dtype).scatter(1, indices, weights)
            for e, expert in enumerate(self.experts):
                out = out + expert(x) * dense_weights[:, e, None]
            return out.reshape(shape), router_logits
        with torch.no_grad():
            chosen = F.one_hot(indices, self.num_experts).permute(2, 0, 1)  # (experts, tokens, k)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(chosen[e])
            if token_idx.numel() == 0:
                continue
            expert_out = expert(x[token_idx]) * weights[token_idx, slot, None]
            out = out.index_add(0, token_idx, expert_out)
        return out.reshape(shape), router_logits


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer's load-balancing loss (its eq. 4-6, Mixtral's `load_balancing_loss_func`), averaged over the
    mixture layers: num_experts * sum_e f_e * P_e, where f_e is the fraction of the top-k assignments that went to
    expert e and P_e the mean router probability of e. A perfectly balanced router scores 1.0 whatever top_k
    (Mixtral's form counts assignments per token instead of per assignment and scores top_k). Padding tokens
    (attention_mask 0) are left out of both averages. `router_logits`: one (batch * seq, num_experts) tensor a layer.
    """
    logits = torch.stack([layer.float() for layer in router_logits])  # (layers, tokens, experts)
    probs = F.softmax(logits, dim=-1)
    _, chosen = torch.topk(probs, top_k, dim=-1)
    assigned = F.one_hot(chosen, num_experts).sum(-2).to(probs.dtype)  # (layers, tokens, experts): 0/1 a token
    if attention_mask is None:
        keep = torch.ones(logits.shape[1], device=logits.device)
    else:
        # during cached decoding the mask covers the past too: the router saw only the last positions
        seq = logits.shape[1] // attention_mask.shape[0]
        keep = attention_mask[:, -seq:].reshape(-1).to(device=logits.device, dtype=probs.dtype)
    real = keep.sum().clamp(min=1)
    fraction = (assigned * keep[:, None]).sum(1) / (real * top_k)  # (layers, experts), sums to 1 a layer
    mean_prob = (probs * keep[:, None]).sum(1) / real
    return num_experts * (fraction * mean_prob).sum(-1).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Block


class HFGPTBlock(GradientCheckpointingLayer):
    """One decoder block: attention then MLP, each a residual branch.

    pre-norm (GPT-2 onwards):     x = x + drop(attn(ln_1(x)));   x = x + drop(mlp(ln_2(x)))
    post-norm (original paper):   x = ln_1(x + drop(attn(x)));   x = ln_2(x + drop(mlp(x)))
    """

    def __init__(self, config: HFGPTConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.ln_1 = make_norm(config)
        self.attn = HFGPTAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = HFGPTSparseMoeBlock(config) if self.is_moe else HFGPTMLP(config)
        self.dropout = nn.Dropout(config.residual_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        x = hidden_states
        if self.pre_norm:
            attn_out, _ = self.attn(self.ln_1(x), attention_mask, position_embeddings, cache, **kwargs)
            x = x + self.dropout(attn_out)
            mlp_out = self.mlp(self.ln_2(x))
        else:
            attn_out, _ = self.attn(x, attention_mask, position_embeddings, cache, **kwargs)
            x = self.ln_1(x + self.dropout(attn_out))
            mlp_out = self.mlp(x)
        if self.is_moe:  # (output, router_logits); the logits are recorded by a hook when wanted (_can_record_outputs)
            mlp_out = mlp_out[0]
        x = x + self.dropout(mlp_out)
        return x if self.pre_norm else self.ln_2(x)


# ---------------------------------------------------------------------------------------------------------------------
# The stack


class HFGPTPreTrainedModel(PreTrainedModel):
    config_class = HFGPTConfig
    config: HFGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HFGPTBlock"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # a classifier (or QA / tagging) head starts from a causal LM's checkpoint: its output head is expected there
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]
    # transformers' output capture: forward hooks record each block's output (hidden_states) and each attention's
    # weights when output_hidden_states / output_attentions ask for them, so the forward pass collects nothing itself
    _can_record_outputs = {
        "hidden_states": HFGPTBlock,
        "attentions": HFGPTAttention,
        "router_logits": OutputRecorder(HFGPTSparseMoeBlock, index=1),
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # normal(0, initializer_range) for Linear/Embedding, ones/zeros for norms
        if isinstance(module, (HFGPTAttention, HFGPTMLP)):
            # GPT-2: scale the projections that write into the residual stream by 1/sqrt(number of residual branches),
            # so the stream's variance does not grow with depth.
            projection = module.o_proj if isinstance(module, HFGPTAttention) else module.down_proj
            std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(projection.weight, mean=0.0, std=std)
        elif isinstance(module, HFGPTSinusoidalPositions):
            # fixed tables are not in the checkpoint: rebuild them (super() rebuilds the rotary ones, as for Llama)
            init.copy_(module.table, sinusoidal_table(module.num_positions, module.dim))


class HFGPTModel(HFGPTPreTrainedModel):
    """Token (+ position) embeddings, `num_hidden_layers` blocks, final norm. Returns the last hidden states."""

    def __init__(self, config: HFGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = None
        self.rotary_emb = None
        if config.position_embedding_type == "learned":
            self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        elif config.position_embedding_type == "sinusoidal":
            self.wpe = HFGPTSinusoidalPositions(config)
        else:
            self.rotary_emb = HFGPTRotaryEmbedding(config)
        self.drop = nn.Dropout(config.embedding_dropout)
        self.h = nn.ModuleList(HFGPTBlock(config, i) for i in range(config.num_hidden_layers))
        # post-norm blocks already end in a norm; a final one would only add a redundant layer
        self.ln_f = make_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def _check_positions(self, positions: int | torch.Tensor) -> None:
        """A learned or sinusoidal table ends at max_position_embeddings: say so, rather than fail in an index lookup.
        What must fit is the largest position, not the row: packed documents restart their positions at 0."""
        if self.wpe is None or torch.compiler.is_compiling():
            return  # rotary positions have no table to run off the end of
        last = int(positions.max() if torch.is_tensor(positions) else positions)
        if last >= self.config.max_position_embeddings:
            raise ValueError(
                f"The input reaches position {last}, but this model has {self.config.position_embedding_type} "
                f"positions 0..{self.config.max_position_embeddings - 1} (max_position_embeddings="
                f"{self.config.max_position_embeddings}). Truncate the input (tokenizer(..., truncation=True, "
                f"max_length={self.config.max_position_embeddings})) or generate fewer tokens; a packed row may be "
                "longer if its position_ids restart at 0 at each document."
            )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # transformers' name before 5.24
    @capture_outputs  # output_hidden_states / output_attentions (flags, or indices of the layers wanted)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        # A cache only helps generation; during training it would also hide packed documents from the mask.
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        cache_from_caller = cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if position_ids is None:
            past_length = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_length
            position_ids = position_ids.unsqueeze(0)
            self._check_positions(past_length + inputs_embeds.shape[1] - 1)  # known without reading the tensor
        else:
            self._check_positions(position_ids)

        hidden_states = inputs_embeds
        position_embeddings = None
        if self.wpe is not None:
            hidden_states = hidden_states + self.wpe(position_ids)
        else:
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
        hidden_states = self.drop(hidden_states)

        # One mask for all layers: causal + padding + packed documents (position_ids restarting at 0). The mask
        # builder looks for packed documents only when it is given no cache; a cache we have just made is empty, so
        # leaving it out gives the same mask and keeps packed documents apart in evaluation too.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache_from_caller,
            position_ids=position_ids,
        )

        for block in self.h:
            hidden_states = block(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                cache=cache,
                **kwargs,
            )
        hidden_states = self.ln_f(hidden_states)
        if self.config.is_moe:  # capture_outputs fills router_logits when output_router_logits asks for them
            return MoeModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


# ---------------------------------------------------------------------------------------------------------------------
# Heads


class HFGPTForCausalLM(HFGPTPreTrainedModel, GenerationMixin):
    """The language model: the stack plus a projection to vocabulary logits (tied to the token embedding)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: HFGPTConfig):
        super().__init__(config)
        self.transformer = HFGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # transformers' name before 5.24
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | MoeCausalLMOutputWithPast:
        r"""`labels` are the input ids themselves (shifted inside the loss), -100 where no loss is wanted.
        `num_items_in_batch` (passed by Trainer through **kwargs) makes the loss a per-token mean over the whole
        accumulated batch. `logits_to_keep=k` computes logits for the last k positions only (generation needs 1).

        A mixture-of-experts model (config.num_experts >= 2) returns a MoeCausalLMOutputWithPast. In training with
        labels, or whenever `output_router_logits` (argument or config) is set, it also returns the router logits and
        the load-balancing loss `aux_loss`, whose `router_aux_loss_coef` multiple is added to `loss` when labels are
        given. Under gradient accumulation (num_items_in_batch) the balance loss is weighted by this micro-batch's
        share of the label tokens, so the accumulated total is the batch's token-weighted mean balance loss, once."""
        if labels is not None and use_cache is None:
            use_cache = False  # computing a loss needs no cache
        moe = self.config.is_moe
        if moe:
            if output_router_logits is None:
                output_router_logits = self.config.output_router_logits
            collect_router_logits = output_router_logits or (
                labels is not None and self.training and self.config.router_aux_loss_coef > 0
            )
            kwargs["output_router_logits"] = collect_router_logits
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        kwargs.pop("output_router_logits", None)
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        if not moe:
            return CausalLMOutputWithPast(
                loss=loss,
                logits=logits,
                cache=outputs.cache,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
            )

        aux_loss = None
        if collect_router_logits:
            aux_loss = load_balancing_loss(
                outputs.router_logits, self.config.num_experts, self.config.num_experts_per_tok, attention_mask
            )
            if labels is not None:
                aux = aux_loss.to(loss.device)
                num_items_in_batch = kwargs.get("num_items_in_batch")
                if num_items_in_batch is not None:
                    # the LM loss of each micro-batch is a sum over its tokens / the accumulated batch's token count;
                    # weighting the balance loss by the same share makes the accumulated sum one mean, not steps x it
                    shift_labels = kwargs.get("shift_labels")
                    targets = labels[..., 1:] if shift_labels is None else shift_labels
                    tokens_here = (targets != -100).sum()
                    aux = aux * tokens_here.to(aux.dtype) / torch.as_tensor(num_items_in_batch).to(aux)
                loss = loss + self.config.router_aux_loss_coef * aux
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
        )


class HFGPTForSequenceClassification(HFGPTPreTrainedModel):
    """Classifies a sequence from the hidden state of its last real (non-padding) token, which has seen it all, or
    (config.classifier_pooling="mean") from the average of its real tokens' hidden states."""

    def __init__(self, config: HFGPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = HFGPTModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def _last_token_index(self, input_ids, attention_mask, batch_size: int, seq_len: int, device) -> torch.Tensor:
        positions = torch.arange(seq_len, device=device)
        if attention_mask is not None:  # rightmost attended position: right- and left-padding alike
            return (positions * attention_mask.to(device=device, dtype=positions.dtype)).argmax(-1)
        if self.config.pad_token_id is not None and input_ids is not None:
            return (positions * (input_ids != self.config.pad_token_id).to(positions.dtype)).argmax(-1)
        if batch_size > 1:
            raise ValueError(
                "Cannot find the last token of each row in a batch of more than one sequence: pass the "
                "attention_mask from the tokenizer, or set config.pad_token_id (e.g. model.config.pad_token_id = "
                "tokenizer.pad_token_id)."
            )
        return torch.full((batch_size,), seq_len - 1, device=device)

    def _pool(self, hidden_states, input_ids, attention_mask) -> torch.Tensor:
        batch_size, seq_len = hidden_states.shape[:2]
        device = hidden_states.device
        if self.config.classifier_pooling == "mean" and attention_mask is not None:
            real = attention_mask.to(device=device, dtype=hidden_states.dtype)  # the tokens the mask keeps
        else:
            last = self._last_token_index(input_ids, attention_mask, batch_size, seq_len, device)
            if self.config.classifier_pooling == "last":
                return hidden_states[torch.arange(batch_size, device=device), last]
            real = (torch.arange(seq_len, device=device) <= last.unsqueeze(-1)).to(hidden_states.dtype)
        # mean over the real tokens
        return (hidden_states * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True).clamp(min=1)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # transformers' name before 5.24
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=False if use_cache is None else use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.score(self.dropout(self._pool(hidden_states, input_ids, attention_mask)))

        loss = None
        if labels is not None:
            # kwargs carry Trainer's num_items_in_batch: without it, gradient accumulation multiplies the loss
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config, **kwargs)

        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


# transformers' generic heads, as Llama has them: per-token labels (NER, tagging) and extractive question answering
# (start/end logits over the tokens). They build their backbone with AutoModel.from_config(config), so AutoModel must
# map the config to HFGPTModel. hfgpt's __init__ registers its own classes; under trust_remote_code the config class is
# loaded apart from this file (another class object, unregistered), hence the registration of type(config) here.


class HFGPTForTokenClassification(GenericForTokenClassification, HFGPTPreTrainedModel):
    """A label for every token, from its hidden state (which has seen only the tokens before it)."""

    base_model_prefix = "transformer"

    def __init__(self, config: HFGPTConfig):
        AutoModel.register(type(config), HFGPTModel, exist_ok=True)
        super().__init__(config)


class HFGPTForQuestionAnswering(GenericForQuestionAnswering, HFGPTPreTrainedModel):
    """Extractive question answering: start and end logits for every token of the context."""

    base_model_prefix = "transformer"

    def __init__(self, config: HFGPTConfig):
        AutoModel.register(type(config), HFGPTModel, exist_ok=True)
        super().__init__(config)

    def get_input_embeddings(self) -> nn.Embedding:  # the generic head looks for Llama's `embed_tokens`
        return self.transformer.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.set_input_embeddings(value)

__all__ = [
    "HFGPTPreTrainedModel",
    "HFGPTModel",
    "HFGPTForCausalLM",
    "HFGPTForSequenceClassification",
    "HFGPTForTokenClassification",
    "HFGPTForQuestionAnswering",
]

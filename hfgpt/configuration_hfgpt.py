"""HFGPTConfig: every architecture switch of hfgpt, validated at construction.

This file imports only transformers, so that `save_pretrained` can ship it next to the weights as remote code.
"""

import transformers
from packaging import version
from transformers import PreTrainedConfig

# The oldest transformers whose APIs the modelling code uses (pyproject.toml pins the same). Checked here because this
# file is the first one `trust_remote_code` imports: without the check, an older transformers fails on some import
# deep in modeling_hfgpt.py with no word on what to do.
MIN_TRANSFORMERS_VERSION = "5.24"
if version.parse(transformers.__version__) < version.parse(MIN_TRANSFORMERS_VERSION):
    raise ImportError(
        f"hfgpt models need transformers >= {MIN_TRANSFORMERS_VERSION}, but transformers {transformers.__version__} "
        f"is installed. Upgrade it: pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'"
    )

POSITION_EMBEDDING_TYPES = ("learned", "sinusoidal", "rope")
NORM_TYPES = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
HIDDEN_ACTS = ("gelu", "gelu_new", "relu", "swiglu")
CLASSIFIER_POOLINGS = ("last", "mean")
# RoPE scaling (`rope_parameters["rope_type"]`), computed by transformers' RoPE functions, with the keys each needs
# besides rope_theta (original_max_position_embeddings defaults to max_position_embeddings)
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}

_GPT2 = dict(vocab_size=50257, max_position_embeddings=1024, bos_token_id=50256, eos_token_id=50256,
             hidden_act="gelu_new", bias=True, tie_word_embeddings=True)

# Named shapes. `tiny` is for tests; `mini` is the quickstart's (minutes on 2 CPU cores); `small` trains on a laptop
# CPU; the gpt2-* presets match OpenAI's GPT-2 shapes; `modern` is the same 124M budget with the choices later models
# settled on (RoPE, RMSNorm, SwiGLU, GQA, no biases).
# Where the Auto classes find our code when the model is loaded with trust_remote_code=True (the files are copied
# next to the weights by save_pretrained). All heads are listed, whichever head was saved.
AUTO_MAP = {
    "AutoConfig": "configuration_hfgpt.HFGPTConfig",
    "AutoModel": "modeling_hfgpt.HFGPTModel",
    "AutoModelForCausalLM": "modeling_hfgpt.HFGPTForCausalLM",
    "AutoModelForSequenceClassification": "modeling_hfgpt.HFGPTForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_hfgpt.HFGPTForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_hfgpt.HFGPTForQuestionAnswering",
}

PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=128),
    "mini": dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=128),
    "small": dict(vocab_size=8192, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                  max_position_embeddings=256),
    "gpt2": dict(_GPT2, hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "gpt2-medium": dict(_GPT2, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "gpt2-large": dict(_GPT2, hidden_size=1280, num_hidden_layers=36, num_attention_heads=20),
    "gpt2-xl": dict(_GPT2, hidden_size=1600, num_hidden_layers=48, num_attention_heads=25),
    "modern": dict(vocab_size=50257, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=4, max_position_embeddings=2048, position_embedding_type="rope",
                   norm_type="rmsnorm", hidden_act="swiglu", bias=False, tie_word_embeddings=True),
    "modern-tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=128, position_embedding_type="rope",
                        norm_type="rmsnorm", hidden_act="swiglu", bias=False),
}


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, allowed))}.")


def _check_probability(name: str, value) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} must be a probability in [0, 1).")


class HFGPTConfig(PreTrainedConfig):
    r"""Configuration of an hfgpt model. The defaults are GPT-2 small (124M).

    Args:
        vocab_size: number of tokens in the vocabulary.
        hidden_size (`n_embd`): width of the residual stream.
        num_hidden_layers (`n_layer`): number of decoder blocks.
        num_attention_heads (`n_head`): number of query heads.
        num_key_value_heads: key/value heads; fewer than `num_attention_heads` is grouped-query attention,
            1 is multi-query attention. Defaults to `num_attention_heads`.
        intermediate_size (`n_inner`): hidden width of the MLP. Defaults to 4 * hidden_size, or for SwiGLU to
            8/3 * hidden_size rounded up to a multiple of 64 (same parameter count as the 4x GELU MLP).
        max_position_embeddings (`n_positions`): the longest sequence the model accepts.
        position_embedding_type: "learned" (GPT-2), "sinusoidal" (the original Transformer) or "rope" (rotary).
        rope_parameters: transformers' standard RoPE dict: "rope_theta" (the base of the rotary frequencies) and
            "rope_type": "default", or a scaling that runs a RoPE model past its trained context, as for Llama:
            "linear" / "dynamic" (NTK) with "factor"; "yarn" with "factor" (and optionally
            "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"); "llama3" with "factor",
            "low_freq_factor", "high_freq_factor", "original_max_position_embeddings".
        rope_theta: the base of the rotary frequencies, as older configs spell it (stored in rope_parameters).
        norm_type: "layernorm" or "rmsnorm".
        norm_position: "pre" (GPT-2 and later: norm inside the residual branch) or "post" (the original Transformer:
            norm after the residual addition).
        norm_eps: epsilon of the normalisation layers.
        hidden_act: "gelu" (exact), "gelu_new" (GPT-2's tanh approximation), "relu" or "swiglu" (gated MLP).
        bias: whether linear layers and LayerNorm carry biases.
        embedding_dropout, attention_dropout, residual_dropout: dropout probabilities.
        initializer_range: standard deviation of the normal initialisation; residual output projections are further
            scaled by 1/sqrt(2 * num_hidden_layers) as in GPT-2.
        tie_word_embeddings: share the input embedding and the output projection.
        classifier_dropout: dropout before the sequence-classification head.
        classifier_pooling: what the sequence-classification head reads: "last", the hidden state of the last real
            token (which has attended to the whole text; GPT-2's and transformers' convention), or "mean", the
            average over the real tokens.
        num_experts: 0 or 1 for the dense model (the default); 2 or more makes the MLP of the mixture-of-experts
            layers a sparse mixture (Switch Transformer, Mixtral): a router picks `num_experts_per_tok` of
            `num_experts` copies of the block's MLP for every token (so `hidden_act`, SwiGLU included, applies to every
            expert) and adds their outputs weighted by the router's softmax, renormalised over the chosen ones.
        num_experts_per_tok: how many experts each token is sent to (top-k routing), 1..num_experts.
        moe_every_n_layers: which blocks are mixtures: block i (from 0) when (i + 1) % n == 0, as Qwen2-MoE's
            decoder_sparse_step: 1 (every block, the default), 2 (every other block, as Switch Transformer), ...
        router_aux_loss_coef: weight of the load-balancing loss (Switch Transformer's, normalised so that a perfectly
            balanced router scores 1.0) added to the causal LM loss in training. 0 switches it off.
        output_router_logits: return every mixture layer's router logits (and the balance loss, `aux_loss`) in eval
            too; in training they are always collected for the balance loss.
    """

    model_type = "hfgpt"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "n_embd": "hidden_size",
        "n_layer": "num_hidden_layers",
        "n_head": "num_attention_heads",
        "n_positions": "max_position_embeddings",
        "n_inner": "intermediate_size",
        # the names transformers' MoE models (Mixtral, Qwen2-MoE) give the same settings; the MoE ones exist only on
        # mixture-of-experts configs, as theirs (tools such as TRL take output_router_logits for the sign of one)
        "num_local_experts": "num_experts",
        "decoder_sparse_step": "moe_every_n_layers",
        "moe_intermediate_size": "intermediate_size",
    }

    def __init__(
        self,
        vocab_size: int = 50257,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 1024,
        position_embedding_type: str = "learned",
        rope_parameters: dict | None = None,
        rope_theta: float | None = None,
        norm_type: str = "layernorm",
        norm_position: str = "pre",
        norm_eps: float = 1e-5,
        hidden_act: str = "gelu_new",
        bias: bool = True,
        embedding_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        residual_dropout: float = 0.0,
        classifier_dropout: float = 0.0,
        classifier_pooling: str = "last",
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        num_experts: int = 0,
        num_experts_per_tok: int = 2,
        moe_every_n_layers: int = 1,
        router_aux_loss_coef: float = 0.01,
        output_router_logits: bool = False,
        **kwargs,
    ):
        # GPT-2 spellings passed as keywords win over the defaults above.
        hidden_size = kwargs.pop("n_embd", hidden_size)
        num_hidden_layers = kwargs.pop("n_layer", num_hidden_layers)
        num_attention_heads = kwargs.pop("n_head", num_attention_heads)
        max_position_embeddings = kwargs.pop("n_positions", max_position_embeddings)
        intermediate_size = kwargs.pop("n_inner", intermediate_size)
        num_experts = kwargs.pop("num_local_experts", num_experts)
        moe_every_n_layers = kwargs.pop("decoder_sparse_step", moe_every_n_layers)
        intermediate_size = kwargs.pop("moe_intermediate_size", intermediate_size)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding_type = position_embedding_type
        # transformers' RoPE dict; older configs spell its base rope_theta, beside it, and its scaling rope_scaling.
        # super().__init__ completes it (rope_type, original_max_position_embeddings) and runs transformers' checks,
        # which raise a bare KeyError for a missing key: hfgpt's check runs first and names what is wrong.
        rope_parameters = rope_parameters or kwargs.pop("rope_scaling", None) or {}
        self.rope_parameters = {"rope_theta": self.default_theta if rope_theta is None else float(rope_theta),
                                **rope_parameters}
        self._validate_rope_parameters()
        self.norm_type = norm_type
        self.norm_position = norm_position
        self.norm_eps = norm_eps
        self.hidden_act = hidden_act
        self.bias = bias
        self.embedding_dropout = embedding_dropout
        self.attention_dropout = attention_dropout
        self.residual_dropout = residual_dropout
        self.classifier_dropout = classifier_dropout
        self.classifier_pooling = classifier_pooling
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        if intermediate_size is None:
            intermediate_size = self.default_intermediate_size(hidden_size, hidden_act)
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        # the other MoE settings are checked whatever num_experts, but kept only on a mixture-of-experts config: a
        # dense config has no output_router_logits / num_experts_per_tok, as for transformers' dense models
        moe_settings = dict(num_experts_per_tok=num_experts_per_tok, moe_every_n_layers=moe_every_n_layers,
                            router_aux_loss_coef=router_aux_loss_coef, output_router_logits=output_router_logits)
        _check_moe(num_experts, num_hidden_layers, **moe_settings)
        if num_experts > 1:
            for name, value in moe_settings.items():
                setattr(self, name, value)
        # every head, also in configs saved before a head existed (theirs keep what they name)
        kwargs["auto_map"] = {**AUTO_MAP, **(kwargs.get("auto_map") or {})}
        super().__init__(**kwargs)
        self.validate()

    @staticmethod
    def default_intermediate_size(hidden_size: int, hidden_act: str) -> int:
        if hidden_act == "swiglu":  # three matrices instead of two: 2/3 of the width keeps the parameter count
            return 64 * -(-8 * hidden_size // 3 // 64)
        return 4 * hidden_size

    @property
    def is_moe(self) -> bool:
        """Whether some blocks are mixtures of experts (num_experts >= 2)."""
        return self.num_experts > 1

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block `layer_idx` (from 0) has a mixture of experts for its MLP."""
        return self.is_moe and (layer_idx + 1) % self.moe_every_n_layers == 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_theta(self) -> float:
        """The base of the rotary frequencies; one value, kept in rope_parameters."""
        return self.rope_parameters.get("rope_theta", self.default_theta)

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        self.rope_parameters["rope_theta"] = float(value)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # from_pretrained(path, **overrides) builds the config and then setattr()s the overrides onto it, past
        # __init__: a rope_parameters override (RoPE scaling for a trained model) keeps the checkpoint's rope_theta
        # unless it names one, and is completed as __init__ completes it. Then everything is checked again, so a bad
        # override fails here, not deep in the model.
        rope_parameters = kwargs.pop("rope_parameters", None)
        loaded = super().from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if rope_parameters is not None:
            config.rope_parameters = {"rope_theta": config.rope_theta, **rope_parameters}
            config.standardize_rope_params()
        config.validate()
        return loaded

    def validate(self) -> None:
        """Raise a ValueError naming the bad value and what is allowed. Called at construction, after
        `from_pretrained` overrides and by `save_pretrained`."""
        self._validate_rope_parameters()  # before transformers' RoPE checks, which raise a bare KeyError
        super().validate()  # transformers' own checks (special token ids, output_attentions, RoPE keys)
        _check_choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDING_TYPES)
        _check_choice("norm_type", self.norm_type, NORM_TYPES)
        _check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        _check_choice("hidden_act", self.hidden_act, HIDDEN_ACTS)
        _check_choice("classifier_pooling", self.classifier_pooling, CLASSIFIER_POOLINGS)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; "
                f"pick a head count that divides it (e.g. {_divisors_near(self.hidden_size, self.num_attention_heads)})."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}; each key/value head must serve a whole group of "
                "query heads."
            )
        if self.position_embedding_type != "learned" and self.head_dim % 2:
            raise ValueError(
                f"{self.position_embedding_type} positions need an even head_dim, got "
                f"hidden_size/num_attention_heads={self.head_dim}."
            )
        if self.position_embedding_type == "sinusoidal" and self.hidden_size % 2:
            raise ValueError(f"sinusoidal positions need an even hidden_size, got {self.hidden_size}.")
        for name in ("embedding_dropout", "attention_dropout", "residual_dropout", "classifier_dropout"):
            _check_probability(name, getattr(self, name))
        if self.initializer_range <= 0:
            raise ValueError(f"initializer_range={self.initializer_range} must be positive.")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be positive.")
        _check_moe(self.num_experts, self.num_hidden_layers,
                   **{name: getattr(self, name) for name in MOE_SETTINGS if hasattr(self, name)})

    def _validate_rope_parameters(self) -> None:
        rope = self.rope_parameters
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters={rope!r} must be a dict, e.g. {{'rope_type': 'linear', 'factor': 2.0}}.")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        _check_choice("rope_parameters['rope_type']", rope_type, tuple(ROPE_TYPES))
        theta = rope.get("rope_theta")
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
            raise ValueError(f"rope_theta={theta!r} must be a positive number.")
        missing = [key for key in ROPE_TYPES[rope_type] if rope.get(key) is None]
        if missing:
            raise ValueError(f"rope_parameters with rope_type={rope_type!r} needs {', '.join(map(repr, missing))}.")
        if rope_type == "default":
            return
        if self.position_embedding_type != "rope":
            raise ValueError(
                f"rope_parameters rope_type={rope_type!r} scales rotary positions, but this model has "
                f"position_embedding_type={self.position_embedding_type!r}; use 'rope' or rope_type 'default'."
            )
        factor = rope["factor"]
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 1:
            raise ValueError(f"rope_parameters factor={factor!r} must be a number >= 1 (how much longer the context).")
        if rope_type == "llama3" and not rope["low_freq_factor"] < rope["high_freq_factor"]:
            raise ValueError(
                f"rope_parameters low_freq_factor={rope['low_freq_factor']!r} must be below "
                f"high_freq_factor={rope['high_freq_factor']!r}."
            )

    @classmethod
    def presets(cls) -> list[str]:
        """Names accepted by `from_preset`."""
        return list(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "HFGPTConfig":
        """A config from a named shape, e.g. `HFGPTConfig.from_preset("gpt2", vocab_size=8192)`."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; available presets: {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


# the settings a mixture-of-experts config carries besides num_experts
MOE_SETTINGS = ("num_experts_per_tok", "moe_every_n_layers", "router_aux_loss_coef", "output_router_logits")


def _check_moe(num_experts, num_hidden_layers: int, num_experts_per_tok=2, moe_every_n_layers=1,
               router_aux_loss_coef=0.01, output_router_logits=False) -> None:
    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not integer(num_experts) or num_experts < 0:
        raise ValueError(
            f"num_experts={num_experts!r} must be an integer >= 0: 0 or 1 for the dense model, 2 or more for a "
            "mixture of experts."
        )
    coef = router_aux_loss_coef
    if not isinstance(coef, (int, float)) or isinstance(coef, bool) or not 0 <= coef < float("inf"):
        raise ValueError(f"router_aux_loss_coef={coef!r} must be a number >= 0 (0 switches the balance loss off).")
    if not isinstance(output_router_logits, bool):
        raise ValueError(f"output_router_logits={output_router_logits!r} must be True or False.")
    if not integer(num_experts_per_tok) or num_experts_per_tok < 1:
        raise ValueError(f"num_experts_per_tok={num_experts_per_tok!r} must be an integer >= 1.")
    if not integer(moe_every_n_layers) or moe_every_n_layers < 1:
        raise ValueError(f"moe_every_n_layers={moe_every_n_layers!r} must be an integer >= 1.")
    if num_experts < 2:
        return  # the dense model: the other MoE settings are not used
    if num_experts_per_tok > num_experts:
        raise ValueError(
            f"num_experts_per_tok={num_experts_per_tok} must be in 1..num_experts={num_experts}: a token cannot be "
            "sent to more experts than there are."
        )
    if moe_every_n_layers > num_hidden_layers:
        raise ValueError(
            f"moe_every_n_layers={moe_every_n_layers} must be in 1..num_hidden_layers={num_hidden_layers}, or no "
            "block would be a mixture of experts."
        )


def _divisors_near(n: int, target: int) -> str:
    divisors = sorted((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - target))
    return ", ".join(str(d) for d in sorted(divisors[:3]))


__all__ = ["HFGPTConfig"]

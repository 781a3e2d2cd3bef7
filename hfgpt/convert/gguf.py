"""hfgpt -> one GGUF file that llama.cpp (and the tools built on it) runs with nothing else beside it.

The file is written with `gguf`, the library llama.cpp publishes, under one of llama.cpp's own architectures:

    llama   RoPE + RMSNorm + pre-norm + SwiGLU (+ GQA, optional biases): the `modern` presets
    gpt2    learned positions + LayerNorm + pre-norm + gelu_new + biases + one key/value head per query head

and the tokenizer goes inside: the byte-level BPE vocabulary (in its byte-to-unicode spelling, as in tokenizer.json)
and merges, which ids are special, BOS/EOS/pad, whether BOS is prepended, and the chat template.

Two layout facts the conversion has to get right (checked against llama.cpp itself in tests/test_gguf_llama_cpp.py):
- GGUF stores a 2-D tensor as ggml's (columns, rows); `gguf` takes the numpy array in torch's (rows, columns) order
  and writes the reversed shape itself, so nn.Linear weights go in as they are.
- transformers (and hfgpt) rotate the two halves of each head (`rotate_half`); llama.cpp's `llama` rotates adjacent
  pairs. Reordering the rows of each query/key head from [x_0..x_{d/2-1}, y_0..y_{d/2-1}] to [x_0, y_0, x_1, y_1, ...]
  makes llama.cpp's pairs the same pairs, so the attention scores are unchanged.
"""

import json
import os
import re
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..configuration_hfgpt import HFGPTConfig
from ..modeling_hfgpt import HFGPTForCausalLM
from .gpt2 import _load_source, _load_source_config
from .llama import LLAMA_SHAPE, rope_parameters

DTYPES = ("f32", "f16", "q8_0")
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# switch -> the value llama.cpp's gpt2 graph has (its GELU is the tanh approximation, GPT-2's gelu_new)
GPT2_SHAPE = {"position_embedding_type": "learned", "norm_type": "layernorm", "norm_position": "pre",
              "hidden_act": "gelu_new", "bias": True}
# llama.cpp's name for the GPT-2 split regex, which is what hfgpt's ByteLevel(use_regex=True) pre-tokenizer applies
GPT2_PRE_TOKENIZER = "gpt-2"


# ---------------------------------------------------------------------------------------------------------------------
# Which llama.cpp architecture


def gguf_architecture(config: HFGPTConfig) -> str:
    """"llama" or "gpt2", or a ValueError naming the first switch neither can express."""
    shape = LLAMA_SHAPE if config.position_embedding_type == "rope" else GPT2_SHAPE
    for name, value in shape.items():
        if getattr(config, name) != value:
            raise ValueError(
                f"This hfgpt model has {name}={getattr(config, name)!r}, which no llama.cpp architecture this export "
                f"writes can hold: 'llama' needs {', '.join(f'{k}={v!r}' for k, v in LLAMA_SHAPE.items())}; 'gpt2' "
                f"needs {', '.join(f'{k}={v!r}' for k, v in GPT2_SHAPE.items())} and one key/value head per head."
            )
    if shape is GPT2_SHAPE and config.num_key_value_heads != config.num_attention_heads:
        raise ValueError(f"This hfgpt model has num_key_value_heads={config.num_key_value_heads}; llama.cpp's gpt2 "
                         "needs one key/value head per attention head (grouped-query attention needs RoPE: 'llama').")
    rope_type = rope_parameters(config).get("rope_type", "default")
    if shape is LLAMA_SHAPE and rope_type != "default":
        raise ValueError(f"This hfgpt model has rope_parameters rope_type={rope_type!r}; the GGUF export writes plain "
                         "RoPE only ('default'). Export it with --to llama and use llama.cpp's convert_hf_to_gguf.py.")
    return "llama" if shape is LLAMA_SHAPE else "gpt2"


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def byte_level_bpe_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their llama.cpp token types, merges) of a GPT-2 style byte-level BPE tokenizer, or a ValueError.

    llama.cpp re-implements the tokenizer from these lists plus the pre-tokenizer's name, so anything it would do
    differently (a normalizer, another split regex, a prefix space, subword prefixes) is refused, not approximated.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model, pre, decoder = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"its model is {model.get('type', type(tokenizer).__name__)!r}, not BPE")
    if spec.get("normalizer"):
        problems.append(f"it has a {spec['normalizer'].get('type')!r} normalizer")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        problems.append(f"its pre-tokenizer is {pre.get('type')!r} (llama.cpp's 'gpt-2' needs ByteLevel with the GPT-2 "
                        "regex and no prefix space)")
    if decoder.get("type") != "ByteLevel":
        problems.append(f"its decoder is {decoder.get('type')!r}, not ByteLevel")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("byte_fallback"):
        problems.append("its BPE uses subword prefixes/suffixes or byte fallback")
    if problems:
        raise ValueError(
            f"The tokenizer is not a GPT-2 style byte-level BPE ({'; '.join(problems)}), which is what the GGUF export "
            "writes. Train one with hfgpt (hfgpt.tokenization.train_tokenizer), or export --to llama and convert "
            "that directory with llama.cpp's convert_hf_to_gguf.py."
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"The tokenizer has ids up to {max(vocab.values())}, beyond the model's "
                         f"vocab_size={vocab_size}.")
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken: special ones are CONTROL, the others USER_DEFINED
    tokens, types = [], []
    for index in range(vocab_size):  # rows of the embedding no token uses still need a (never produced) entry
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL if index not in added else
                         gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
    # tokenizer.json spells merges as "a b" (older) or ["a", "b"] (tokenizers >= 0.20); GGUF wants "a b"
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    return tokens, types, merges


def adds_bos_eos(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    """Whether encoding text prepends BOS / appends EOS, read from what the tokenizer does rather than its flags
    (hfgpt's prepends BOS through its post-processor)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id is not None and len(full) > len(plain) and full[0] == tokenizer.bos_token_id
    eos = tokenizer.eos_token_id is not None and len(full) > len(plain) + bos and full[-1] == tokenizer.eos_token_id
    return bos, eos


def portable_chat_template(template: str) -> str:
    """transformers' `{% generation %}` blocks only mark the assistant's tokens for training masks; other Jinja
    engines (llama.cpp's, llama-cpp-python's jinja2) do not know the tag. An always-true `if` renders the same and
    keeps the tags' whitespace control."""
    template = re.sub(r"\{%(-?)\s*generation\s*(-?)%\}", r"{%\1 if true \2%}", template)
    return re.sub(r"\{%(-?)\s*endgeneration\s*(-?)%\}", r"{%\1 endif \2%}", template)


def _chat_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: transformers uses "default"
        template = template.get("default")
    return portable_chat_template(template) if template else None


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, config: HFGPTConfig) -> None:
    tokens, types, merges = byte_level_bpe_vocab(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(GPT2_PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id)):
        index = getattr(tokenizer, f"{name}_token_id")
        index = getattr(config, f"{name}_token_id") if index is None else index
        if index is not None:
            add(index)
    add_bos, add_eos = adds_bos_eos(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = _chat_template(tokenizer)
    if template:
        writer.add_chat_template(template)


# ---------------------------------------------------------------------------------------------------------------------
# Tensors


def interleave_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder each head's rows (or bias entries) from halves to adjacent pairs; see the module docstring."""
    head_dim = weight.shape[0] // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _name(tensor: gguf.MODEL_TENSOR, suffix: str, block: int | None = None) -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=block) + "." + suffix  # the gguf package knows llama.cpp's names


def gguf_tensors(model: HFGPTForCausalLM, architecture: str) -> dict[str, torch.Tensor]:
    """Every tensor under its llama.cpp name, in torch layout. A tied lm_head is left out: llama.cpp then uses
    token_embd as the output projection, as the tied model does."""
    config, T = model.config, gguf.MODEL_TENSOR
    sd = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    out = {_name(T.TOKEN_EMBD, "weight"): sd.pop("transformer.wte.weight")}
    lm_head = sd.pop("lm_head.weight")
    if not config.tie_word_embeddings:
        out[_name(T.OUTPUT, "weight")] = lm_head
    if architecture == "gpt2":
        out[_name(T.POS_EMBD, "weight")] = sd.pop("transformer.wpe.weight")
    for kind in ("weight", "bias"):
        if f"transformer.ln_f.{kind}" in sd:
            out[_name(T.OUTPUT_NORM, kind)] = sd.pop(f"transformer.ln_f.{kind}")
    for i in range(config.num_hidden_layers):
        prefix = f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            if prefix + f"ln_1.{kind}" not in sd and kind == "bias":
                continue  # RMSNorm and bias-free models have no biases
            out[_name(T.ATTN_NORM, kind, i)] = sd.pop(prefix + f"ln_1.{kind}")
            out[_name(T.FFN_NORM, kind, i)] = sd.pop(prefix + f"ln_2.{kind}")
        for kind in ("weight", "bias"):
            if prefix + f"attn.q_proj.{kind}" not in sd:
                continue
            q, k, v = (sd.pop(prefix + f"attn.{p}_proj.{kind}") for p in "qkv")
            if architecture == "gpt2":  # one fused projection, q then k then v rows
                out[_name(T.ATTN_QKV, kind, i)] = torch.cat([q, k, v])
            else:
                out[_name(T.ATTN_Q, kind, i)] = interleave_rotary_rows(q, config.num_attention_heads)
                out[_name(T.ATTN_K, kind, i)] = interleave_rotary_rows(k, config.num_key_value_heads)
                out[_name(T.ATTN_V, kind, i)] = v
            out[_name(T.ATTN_OUT, kind, i)] = sd.pop(prefix + f"attn.o_proj.{kind}")
            for proj, tensor in (("up", T.FFN_UP), ("down", T.FFN_DOWN), ("gate", T.FFN_GATE)):
                if prefix + f"mlp.{proj}_proj.{kind}" in sd:
                    out[_name(tensor, kind, i)] = sd.pop(prefix + f"mlp.{proj}_proj.{kind}")
    if sd:
        raise ValueError(f"The model has tensors the GGUF export does not know ({', '.join(sorted(sd)[:5])}).")
    return out


def _encode(tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """1-D tensors (norms, biases) stay f32, as llama.cpp expects; matrices take the requested type. q8_0 works on
    blocks of 32 along a row: a matrix whose rows are not a multiple of 32 long falls back to f16."""
    array = tensor.numpy()
    if array.ndim == 1 or dtype == "f32":
        return array.astype(np.float32), None
    if dtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array, qtype), qtype
    return array.astype(np.float16), None


# ---------------------------------------------------------------------------------------------------------------------
# The file


def write_gguf(model: HFGPTForCausalLM, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike,
               dtype: str = "f16", name: str | None = None) -> None:
    """Write `model` and `tokenizer` as one GGUF file at `path` (no atomicity here; see `hfgpt_to_gguf`)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}.")
    config = model.config
    architecture = gguf_architecture(config)
    writer = gguf.GGUFWriter(path, architecture)
    if name:
        writer.add_name(name)
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    if architecture == "llama":
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(rope_parameters(config)["rope_theta"])
        writer.add_layer_norm_rms_eps(config.norm_eps)
    else:
        writer.add_layer_norm_eps(config.norm_eps)
    write_tokenizer(writer, tokenizer, config)
    for tensor_name, tensor in gguf_tensors(model, architecture).items():
        data, raw_dtype = _encode(tensor, dtype)
        writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def hfgpt_to_gguf(source_dir: str | os.PathLike, output_file: str | os.PathLike, dtype: str = "f16") -> Path:
    """Convert an hfgpt directory (Llama- or GPT-2-shaped, with a byte-level BPE tokenizer) into one GGUF file.
    The file is written beside its final name and renamed at the end: a failed export leaves nothing behind."""
    source, output = str(source_dir), Path(output_file)
    config = _load_source_config(source, "hfgpt", "Only hfgpt models export to GGUF.")
    gguf_architecture(config)  # refuse before any weight is read
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(f"{source} has no loadable tokenizer ({error}); a GGUF file carries its tokenizer, so save "
                         "the tokenizer into the model directory first.") from None
    byte_level_bpe_vocab(tokenizer, config.vocab_size)  # and refuse a tokenizer llama.cpp would not reproduce
    model = _load_source(HFGPTForCausalLM, source)
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{output.name}.partial-", dir=output.parent)
    os.close(handle)
    try:
        write_gguf(model, tokenizer, partial, dtype=dtype, name=Path(source).name)
        os.replace(partial, output)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return output

"""LoRA and QLoRA for hfgpt models with PEFT, shared by every training script (classification, SFT, DPO).

    peft_args = PeftArguments(qlora=True)                     # the --lora / --qlora / --lora_* flags
    model = load_base_model(path, AutoModelForSequenceClassification, peft_args, num_labels=2)
    memory = linear_memory_footprint(model)                   # before the adapters go in
    model = add_lora(model, peft_args, task_type="SEQ_CLS")   # adapters + a trainable copy of the head
    ... Trainer(model=model, ...).train() ...
    save_adapter(model, output_dir, tokenizer)                # output_dir/adapter: loads with AutoPeftModelFor...
    merged = merge_adapter(output_dir / "adapter")            # a plain hfgpt model: loads without PEFT

QLoRA (Dettmers et al., 2023) loads the frozen base weights of the decoder blocks in 4-bit NF4 with double
quantisation (bitsandbytes) and trains LoRA adapters (Hu et al., 2021) in a higher-precision compute dtype on top.
Embeddings, the tied output head and the classification head stay in full precision. Merging always reloads the
base in float32, so a QLoRA adapter merges into the original weights, not into their 4-bit rounding.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import files

# The linear layers of an hfgpt block (gate_proj only with hidden_act="swiglu"; gate, the router, only in a mixture of
# experts, whose experts' layers are the MLP's names): what users target with PEFT.
HFGPT_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate")
# The head of HFGPTForSequenceClassification: newly initialised when fine-tuning starts from a language model, so
# it is trained in full (PEFT's modules_to_save) and saved with the adapter.
CLASSIFIER_HEAD = "score"
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")


@dataclass
class PeftArguments:
    """The parameter-efficient fine-tuning flags every hfgpt training script takes."""

    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (plus the classification head, for "
                                                        "classifiers) instead of all the weights."})
    qlora: bool = field(default=False, metadata={"help": "QLoRA: load the base model's block weights in 4-bit NF4 "
                                                         "(bitsandbytes, double quantisation) and train LoRA adapters "
                                                         "on top. Implies --lora."})
    lora_r: int = field(default=8, metadata={"help": "Rank of the LoRA update matrices."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling: the update is multiplied by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the input of the LoRA branch."})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA (Kalajdzievski, 2023): scale the update by "
                                                              "alpha / sqrt(r) instead of alpha / r, so that larger "
                                                              "ranks keep learning."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA (Liu et al., 2024): split each adapted weight into "
                                                            "a magnitude vector, trained directly, and a direction "
                                                            "that LoRA updates. Closer to full fine-tuning; each step "
                                                            "costs more."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Linear layers that get adapters, by name (space- or comma-separated), e.g. "
                          "'q_proj v_proj'. Default: every linear layer of the blocks (" + ", ".join(HFGPT_LINEAR_NAMES)
                          + " where present)."},
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full beside the adapters and saved with them (PEFT's modules_to_save), "
                          "by name, e.g. 'wte ln_f' for the token embeddings and the final norm. A classifier's head "
                          "(score) is always among them."},
    )
    merge_adapter: bool = field(default=True, metadata={"help": "After LoRA training, also write the adapter merged "
                                                                "into the base weights: the output directory then "
                                                                "holds a plain hfgpt model that loads without PEFT "
                                                                "(the adapter itself is kept in <output_dir>/adapter)."})

    def __post_init__(self):
        if self.qlora:
            self.lora = True
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be a positive integer, got {self.lora_r}.")
        if self.lora_alpha <= 0:
            raise ValueError(f"--lora_alpha must be positive, got {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        self.lora_target_modules = _name_list(self.lora_target_modules)
        self.lora_modules_to_save = _name_list(self.lora_modules_to_save)


def _name_list(value: str | list[str] | None) -> list[str] | None:
    """Module names given space- or comma-separated (argparse hands over a list, Python callers may pass a string)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    names = [name for item in items for name in item.replace(",", " ").split()]
    return names or None


# --- loading ----------------------------------------------------------------------------------------------------------


def compute_dtype() -> torch.dtype:
    """The dtype QLoRA computes in: bfloat16 on accelerators that support it, float32 otherwise. (CPUs can run
    bfloat16, but most emulate it and run slower than float32; the 4-bit saving is in storage either way.)"""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.bfloat16
    return torch.float32


def quantization_config(skip_modules: list[str] | None = None):
    """QLoRA's 4-bit storage: NF4 with double quantisation (the quantisation constants are quantised too).

    `skip_modules` stay in full precision; bitsandbytes always keeps the output embedding."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(),
        llm_int8_skip_modules=skip_modules,
    )


def load_base_model(model_name_or_path: str | os.PathLike, auto_class, peft_args: PeftArguments | None = None,
                    gradient_checkpointing: bool = False, **from_pretrained_kwargs):
    """`auto_class.from_pretrained(...)`; with --qlora, quantised to 4-bit and prepared for k-bit training
    (base frozen, norms in float32, gradient checkpointing as asked)."""
    import hfgpt  # noqa: F401  (registers the hfgpt Auto classes)
    from hfgpt.quiet import expected_new_head

    is_classifier = "SequenceClassification" in auto_class.__name__
    # a classifier started from a causal LM: its head is new by design (one line, not transformers' report table)
    loading = expected_new_head((CLASSIFIER_HEAD,)) if is_classifier else contextlib.nullcontext()
    if peft_args is None or not peft_args.qlora:
        with loading:
            return auto_class.from_pretrained(model_name_or_path, **from_pretrained_kwargs)

    from peft import prepare_model_for_kbit_training

    with loading:
        model = auto_class.from_pretrained(
            model_name_or_path,
            quantization_config=quantization_config(skip_modules=[CLASSIFIER_HEAD] if is_classifier else None),
            dtype=compute_dtype(),
            **from_pretrained_kwargs,
        )
    keep_4bit_layout_trainable(model)
    # non-reentrant checkpointing lets gradients reach the adapters without forcing the inputs to require grad;
    # PEFT 0.22 renamed the argument (the old name warns until PEFT 1.2 removes it)
    renamed = "activation_checkpointing_kwargs" in inspect.signature(prepare_model_for_kbit_training).parameters
    checkpointing = {"activation_checkpointing_kwargs" if renamed else "gradient_checkpointing_kwargs":
                     {"use_reentrant": False}}
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing, **checkpointing)


def keep_4bit_layout_trainable(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, a `Linear4bit` run in eval mode converts its weights, once and for good, to a layout
    whose kernel has no backward. Training after an evaluation then crashes (layers with a bias) or, worse, silently
    drops the gradient through the frozen base weights (layers without one). The flag below is the one bitsandbytes
    checks; evaluation stays correct, it just uses the training kernel.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# --- adapters ---------------------------------------------------------------------------------------------------------


def _is_lora_internal(name: str) -> bool:
    return any(part.startswith("lora_") or part in ("base_layer", "modules_to_save", "original_module")
               for part in name.split("."))


def _model_module_names(model: nn.Module, kind: type = nn.Module) -> list[str]:
    """Full names of the model's own modules of `kind` (LoRA's added layers left out): what users may name."""
    return [name for name, module in model.named_modules()
            if isinstance(module, kind) and name and not _is_lora_internal(name)]


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct short names of the model's linear layers (what `--lora_target_modules` matches), in model order.
    bitsandbytes' 4-bit layers count (they subclass nn.Linear); LoRA's own layers do not."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in _model_module_names(model, nn.Linear)))


def default_target_modules(model: nn.Module) -> list[str]:
    present = set(linear_module_names(model))
    return [name for name in HFGPT_LINEAR_NAMES if name in present]


def _matches(module_name: str, target: str) -> bool:
    """PEFT's rule for a module name given by the user: the full name, or its last dotted parts."""
    return module_name == target or module_name.endswith("." + target)


def check_target_modules(model: nn.Module, targets: list[str]) -> None:
    """Every target must name at least one linear layer."""
    module_names = _model_module_names(model, nn.Linear)
    missing = [target for target in targets if not any(_matches(name, target) for name in module_names)]
    if missing:
        raise ValueError(
            f"--lora_target_modules {', '.join(map(repr, missing))} matches no linear layer of this "
            f"{type(model).__name__}. Its linear layers are: {', '.join(linear_module_names(model))} "
            f"(full names like {module_names[0]!r}). Pick from those, or leave --lora_target_modules unset to "
            "adapt every linear layer of the blocks."
        )


def check_modules_to_save(model: nn.Module, names: list[str]) -> None:
    """Every name in --lora_modules_to_save must name at least one module, and not a tied token embedding."""
    module_names = _model_module_names(model)
    missing = [target for target in names if not any(_matches(name, target) for name in module_names)]
    if missing:
        short_names = dict.fromkeys(name.rsplit(".", 1)[-1] for name in module_names)
        raise ValueError(
            f"--lora_modules_to_save {', '.join(map(repr, missing))} matches no module of this "
            f"{type(model).__name__}. Its modules are: {', '.join(n for n in short_names if not n.isdigit())}."
        )
    # PEFT copies a module it trains in full; a tied lm_head would keep reading the frozen original
    input_embeddings = model.get_input_embeddings()
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output_embeddings is not None and output_embeddings.weight is input_embeddings.weight:
        input_name = next(name for name, module in model.named_modules() if module is input_embeddings)
        tied = [target for target in names if _matches(input_name, target)]
        if tied:
            raise ValueError(
                f"--lora_modules_to_save {tied[0]!r} is the token embedding, which this model ties to its output "
                "layer (lm_head); a trained copy of it would leave lm_head on the frozen original. Fine-tune all "
                "weights instead, or start from a model saved with tie_word_embeddings=False."
            )


def lora_config(model: nn.Module, peft_args: PeftArguments, task_type: str):
    from peft import LoraConfig

    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type={task_type!r} is not supported; choose one of {', '.join(TASK_TYPES)}.")
    targets = peft_args.lora_target_modules or default_target_modules(model)
    check_target_modules(model, targets)
    to_save = list(peft_args.lora_modules_to_save or [])
    check_modules_to_save(model, to_save)
    if task_type == "SEQ_CLS" and CLASSIFIER_HEAD not in to_save:
        to_save.append(CLASSIFIER_HEAD)
    return LoraConfig(
        task_type=task_type,
        r=peft_args.lora_r,
        lora_alpha=peft_args.lora_alpha,
        lora_dropout=peft_args.lora_dropout,
        use_rslora=peft_args.use_rslora,
        use_dora=peft_args.use_dora,
        target_modules=targets,
        modules_to_save=to_save or None,
    )


def add_lora(model: nn.Module, peft_args: PeftArguments, task_type: str):
    """Wrap `model` with LoRA adapters (a `peft.PeftModel`); everything but the adapters (and a classifier's head)
    is frozen."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, peft_args, task_type))


def save_adapter(model, output_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Save the adapter weights (and a classifier's head) into <output_dir>/adapter, with the tokenizer, so that
    `AutoPeftModelForCausalLM` / `AutoPeftModelForSequenceClassification.from_pretrained` loads it."""
    adapter_dir = Path(output_dir) / files.ADAPTER_DIR
    model.save_pretrained(adapter_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(adapter_dir)
    return adapter_dir


def _auto_class_for(peft_config):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    classes = {"CAUSAL_LM": AutoModelForCausalLM, "SEQ_CLS": AutoModelForSequenceClassification}
    if peft_config.task_type not in classes:
        raise ValueError(f"Cannot merge an adapter with task_type={peft_config.task_type!r}; hfgpt adapters are "
                         f"{' or '.join(classes)}.")
    return classes[peft_config.task_type]


def plain_config(config):
    """A copy of a model config without the quantisation settings a QLoRA run added."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def merge_adapter(adapter_dir: str | os.PathLike, config=None):
    """Load the adapter in `adapter_dir` on its base model in float32 (never 4-bit, even after QLoRA), merge the
    adapter into the weights and return the plain transformers model.

    `config` overrides the base model's config; a classifier needs its own (labels, pad token): pass the trained
    model's `config`. Without it, the config is the one saved next to the adapter by `save_adapter_and_merge`, if any.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig
    from transformers.utils import logging as transformers_logging

    import hfgpt  # noqa: F401

    adapter_dir = Path(adapter_dir)
    peft_config = PeftConfig.from_pretrained(adapter_dir)
    auto_class = _auto_class_for(peft_config)
    if config is None and (adapter_dir / "config.json").is_file():
        config = AutoConfig.from_pretrained(adapter_dir)
    kwargs = {"config": plain_config(config)} if config is not None else {}
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # a classifier's head is "missing" from the base: the adapter has it
    try:
        base = auto_class.from_pretrained(peft_config.base_model_name_or_path, dtype=torch.float32, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)
    model = PeftModel.from_pretrained(base, adapter_dir)
    return model.merge_and_unload()


def write_classifier_base(model, adapter_dir: Path, config) -> Path:
    """PEFT's Auto classes build an adapter's base from its `base_model_name_or_path`, with that directory's config:
    a pretrained language model's, which has no label names (and two labels). So a classifier's adapter gets a base of
    its own, <adapter>/base: the classifier's config (labels), the modelling code, the pretrained weights, hard-linked
    where the file system allows (not a second copy) and copied where not, and the trained head (so nothing is
    "missing" when it loads). The adapter then names that base. Returns it."""
    from huggingface_hub import snapshot_download
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .. import configuration_hfgpt, modeling_hfgpt

    source = Path(model.peft_config[model.active_adapter].base_model_name_or_path)
    if not source.is_dir():  # a Hub id: its files in the local cache
        source = Path(snapshot_download(str(source), allow_patterns=["*.safetensors", "*.safetensors.index.json"]))
    base_dir = adapter_dir / "base"
    shutil.rmtree(base_dir, ignore_errors=True)
    base_dir.mkdir(parents=True)
    index = source / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(source / "model.safetensors", "pt") as handle:
            weight_map = dict.fromkeys(handle.keys(), "model.safetensors")
    # linked under other names: a model.safetensors would be read instead of the index that adds the head
    weight_map = {key: f"base-{name}" for key, name in weight_map.items()}
    for name in set(weight_map.values()):
        original = (source / name.removeprefix("base-")).resolve()
        try:
            os.link(original, base_dir / name)
        except OSError:  # another file system, or no hard links: a copy
            shutil.copy2(original, base_dir / name)
    head = model.base_model.model.get_submodule(CLASSIFIER_HEAD).modules_to_save[model.active_adapter]
    head_tensors = {f"{CLASSIFIER_HEAD}.{name}": tensor.detach().float().cpu().contiguous()
                    for name, tensor in head.state_dict().items()}
    save_file(head_tensors, base_dir / "head.safetensors", metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(head_tensors, "head.safetensors"))
    files.write_json(base_dir / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    config.save_pretrained(base_dir)
    for module in (configuration_hfgpt, modeling_hfgpt):  # for trust_remote_code, as save_pretrained ships them
        shutil.copy(module.__file__, base_dir)
    adapter_config = adapter_dir / "adapter_config.json"
    files.write_json(adapter_config, {**json.loads(adapter_config.read_text()),
                                      "base_model_name_or_path": str(base_dir.resolve())})
    return base_dir


def save_adapter_and_merge(model, output_dir: str | os.PathLike, tokenizer=None, merge: bool = True) -> Path:
    """The end of a LoRA / QLoRA run: the adapter into <output_dir>/adapter (with the model config, so its labels
    survive, and for a classifier a base that has them, so that PEFT's Auto class gives the trained classifier back)
    and, with `merge`, the merged model into <output_dir> itself (safetensors, config, modelling code, tokenizer),
    where every hfgpt tool expects a model. Returns the adapter directory."""
    adapter_dir = save_adapter(model, output_dir, tokenizer)
    config = plain_config(model.config)
    config.save_pretrained(adapter_dir)  # labels and pad id for merge_adapter; PEFT ignores it when loading
    if model.peft_config[model.active_adapter].task_type == "SEQ_CLS":
        write_classifier_base(model, adapter_dir, config)
    if merge:
        merged = merge_adapter(adapter_dir, config=config)
        merged.save_pretrained(output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    return adapter_dir


# --- the run report ---------------------------------------------------------------------------------------------------


def _is_4bit(param) -> bool:
    return type(param).__name__ == "Params4bit" and getattr(param, "quant_state", None) is not None


def _quant_state_tensors(quant_state):
    """The tensors a bitsandbytes QuantState holds (with double quantisation, those of the nested state too)."""
    while quant_state is not None:
        for value in vars(quant_state).values():
            if torch.is_tensor(value):
                yield value
        quant_state = getattr(quant_state, "state2", None)


def parameter_counts(model: nn.Module) -> dict:
    """Trainable and total parameters, each tensor counted once, 4-bit weights by their real element count."""
    trainable = total = 0
    for param in model.parameters():  # parameters() already skips tied duplicates
        count = param.quant_state.shape.numel() if _is_4bit(param) else param.numel()
        total += count
        if param.requires_grad:
            trainable += count
    return {"trainable": trainable, "total": total, "trainable_percent": round(100.0 * trainable / max(total, 1), 4)}


def _is_block_linear(parameter_name: str) -> bool:
    parts = parameter_name.split(".")
    if len(parts) >= 3 and parts[-2] == "base_layer":  # PEFT moves the wrapped layer's weights one level down
        parts = parts[:-2] + parts[-1:]
    return len(parts) >= 2 and parts[-1] in ("weight", "bias") and parts[-2] in HFGPT_LINEAR_NAMES


def linear_memory_footprint(model: nn.Module) -> dict:
    """Memory held by the decoder blocks' linear layers (the ones QLoRA quantises) as loaded, against the same
    layers in float32. 4-bit weights count their packed bytes plus their quantisation constants; tensors shared
    between layers (the NF4 code book) count once."""
    seen, actual, fp32, layers = set(), 0, 0, set()

    def add(tensor: torch.Tensor) -> int:
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key in seen:
            return 0
        seen.add(key)
        return tensor.numel() * tensor.element_size()

    for name, param in model.named_parameters():
        if not _is_block_linear(name) or _is_lora_internal(name.replace(".base_layer.", ".")):
            continue
        layers.add(name.rsplit(".", 1)[0].replace(".base_layer", ""))
        actual += add(param.data)
        if _is_4bit(param):
            actual += sum(add(tensor) for tensor in _quant_state_tensors(param.quant_state))
            fp32 += param.quant_state.shape.numel() * 4
        else:
            fp32 += param.numel() * 4
    return {
        "linear_layers": len(layers),
        "linear_bytes": actual,
        "linear_fp32_bytes": fp32,
        "linear_ratio_to_fp32": round(actual / fp32, 4) if fp32 else None,
        "quantization": "nf4 (double quant)" if any(_is_4bit(p) for p in model.parameters()) else None,
    }


def peak_rss_bytes() -> int | None:
    """The most resident memory this process has used so far (None where the OS does not tell)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux kilobytes


def run_report(model: nn.Module, memory: dict | None = None, peft_args: PeftArguments | None = None) -> dict:
    """What a fine-tuning run cost: parameters (trainable / total), the linear layers' memory (`memory` as measured
    by `linear_memory_footprint` on the base model before LoRA, else now), peak RSS, and the PEFT settings."""
    report = {
        "method": "qlora" if peft_args and peft_args.qlora else "lora" if peft_args and peft_args.lora else "full",
        "parameters": parameter_counts(model),
        "memory": {**(memory or linear_memory_footprint(model)), "peak_rss_bytes": peak_rss_bytes()},
    }
    if peft_args is not None and peft_args.lora:
        from peft import PeftModel

        config = model.peft_config["default"] if isinstance(model, PeftModel) else None
        report["lora"] = {
            "r": peft_args.lora_r,
            "alpha": peft_args.lora_alpha,
            "dropout": peft_args.lora_dropout,
            "use_rslora": peft_args.use_rslora,
            "use_dora": peft_args.use_dora,
            "target_modules": sorted(config.target_modules) if config else peft_args.lora_target_modules,
            # PEFT adds the usual head names ("classifier", "score") for SEQ_CLS: list those this model has
            "modules_to_save": sorted({name for name in config.modules_to_save or []
                                       if any(module.rsplit(".", 1)[-1] == name for module, _ in model.named_modules())})
            if config else None,
            "compute_dtype": str(compute_dtype()).removeprefix("torch.") if peft_args.qlora else None,
        }
    return report

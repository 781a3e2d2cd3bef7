"""Training fast on the hardware at hand: bf16 and torch.compile chosen by default, and tokens/s + MFU in every log.

- `resolve_speed_settings(args, ...)`: call in a TrainingArguments subclass's `__post_init__` (before the parent's).
  `--bf16` and `--torch_compile` (TrainingArguments' own names) default to None there, meaning "hfgpt decides": bf16
  autocast where the device computes bf16 natively (CPU: AVX512-BF16 or AMX; CUDA: compute capability >= 8.0), and
  torch.compile where the task's batches have fixed shapes. `--bf16 false` / `--torch_compile false` turn them off;
  `--bf16 true` where bf16 is only emulated is refused with what to use instead.
- `compile_with_fallback(model)`: torch.compile that falls back to eager, with a warning naming the error, when the
  compiler fails (no C++ compiler, an unsupported op) instead of crashing the run.
- `SpeedMixin`: put it first among a Trainer's bases. It compiles the model when asked, computes fp32 linear layers on
  a CPU through oneDNN where that is measured faster than MKL (hfgpt.onednn), counts the FLOPs of every micro-batch
  (hfgpt.flops, replacing Trainer's 6 N estimate), adds `tokens_per_second` and `mfu` to every training log, and
  `speed_summary()` gives what training_summary.json and the model card record.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from transformers import TrainerCallback

from .. import flops
from ..hardware import compiled_attention_written_out, compiler_available, native_bf16
from ..onednn import onednn_available, onednn_training_linears

# ---------------------------------------------------------------------------------------------------------------------
# What the hardware does well


def training_device(args) -> torch.device:
    """The device a Trainer with these arguments will use, decided before TrainingArguments sets devices up."""
    if not getattr(args, "use_cpu", False) and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class SpeedSettings:
    bf16: bool
    torch_compile: bool
    device: str
    bf16_reason: str
    compile_reason: str

    def describe(self) -> str:
        precision = "bf16 autocast" if self.bf16 else "fp32"
        compiled = "torch.compile on" if self.torch_compile else "torch.compile off"
        return (f"Speed settings on {self.device}: {precision} ({self.bf16_reason}); {compiled} ({self.compile_reason}). "
                "Change them with --bf16 true|false and --torch_compile true|false.")


def resolve_speed_settings(args, compile_by_default: bool, why_not_compiled: str = "") -> SpeedSettings:
    """Fill in `args.bf16` and `args.torch_compile` where the user left them unset (None), check what they set.

    hfgpt compiles the model itself (`SpeedMixin`, with a fallback to eager), so Trainer's own compilation is switched
    off: the chosen value lives in `args.hfgpt_torch_compile`. bf16 on a CPU needs `use_cpu=True` in transformers."""
    device = training_device(args)
    fast, why = native_bf16(device)
    if args.bf16 is None:
        args.bf16 = fast and not args.fp16
        bf16_reason = why if not args.fp16 else "--fp16 was asked for"
    elif args.bf16:
        if not fast:
            raise ValueError(f"--bf16 true: {why}. Train in fp32 (--bf16 false, the default there)"
                             + (", or --fp16 true on this GPU." if device.type == "cuda" else "."))
        bf16_reason = "asked for"
    else:
        bf16_reason = "--bf16 false"
    if args.bf16 and device.type == "cpu":
        args.use_cpu = True  # transformers refuses bf16 without a GPU unless it is told to use the CPU

    requested = args.torch_compile
    # a compile mode or backend asks for compilation (as in TrainingArguments); hfgpt applies them itself
    args.hfgpt_compile_options = {key: value for key, value in (("mode", args.torch_compile_mode),
                                                                ("backend", args.torch_compile_backend)) if value}
    args.torch_compile_mode = args.torch_compile_backend = None
    if requested is None and args.hfgpt_compile_options:
        requested = True
    can_compile, compiler_reason = compiler_available(device)
    if requested is None:
        # "auto": SpeedMixin decides once it knows the run's length (see compile_pays_off)
        compiled = "auto" if compile_by_default and can_compile else False
        compile_reason = compiler_reason if not can_compile else "" if compile_by_default else why_not_compiled
    else:
        compiled = bool(requested)
        compile_reason = "asked for" if compiled else "--torch_compile false"
    args.hfgpt_torch_compile = compiled
    args.torch_compile = False  # SpeedMixin compiles (with a fallback); Trainer must not compile a second time
    settings = SpeedSettings(bf16=bool(args.bf16), torch_compile=compiled is True, device=device.type,
                             bf16_reason=bf16_reason, compile_reason=compile_reason)
    args.hfgpt_speed_settings = settings
    return settings


# Measured on the 2-core development CPU (bench/model_speed.py, `mini` and `small` shapes, bf16): compiling costs
# about 30-40 s the first time (inductor caches its kernels on disk, so later runs of the same shape take a few
# seconds) and makes training steps 25-30% shorter. So it pays for itself in runs whose eager training would take
# more than about two minutes.
COMPILE_PAYS_AFTER_SECONDS = 120.0
# What eager bf16/fp32 training reaches of the measured matmul peak at those shapes, to estimate a run's length
EAGER_MFU_ESTIMATE = 0.3


def compile_pays_off(seconds_estimate: float | None) -> tuple[bool, str]:
    if seconds_estimate is None:
        return False, "the run's length is unknown (streamed data), so compiling may not pay off"
    if seconds_estimate >= COMPILE_PAYS_AFTER_SECONDS:
        return True, f"fixed-shape batches; the run should take ~{seconds_estimate:.0f} s eagerly, so compiling pays"
    return False, (f"the run should take ~{seconds_estimate:.0f} s eagerly, less than the "
                   f"~{COMPILE_PAYS_AFTER_SECONDS:.0f} s after which compiling pays for itself")


@dataclass
class SpeedArguments:
    """Mix into a TrainingArguments subclass, before it (`class A(SpeedArguments, TrainingArguments)`): `--bf16` and
    `--torch_compile` default to hfgpt's choice for the hardware (see `resolve_speed_settings`). Subclasses set
    `compile_by_default`, and `why_not_compiled` when it is False."""

    compile_by_default: ClassVar[bool] = False
    why_not_compiled: ClassVar[str] = "variable-length batches would recompile; --torch_compile true to try it"

    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision (autocast). Default: on where the device computes bf16 natively "
                          "(CPU: AVX512-BF16 or AMX; GPU: compute capability >= 8.0), off elsewhere. fp32 runs on an "
                          "x86 CPU compute their linear layers through oneDNN where it is measured faster than MKL "
                          "(environment: HFGPT_ONEDNN=0 never, 1 always)."})
    torch_compile: bool | None = field(
        default=None,
        metadata={"help": "Compile the model with torch.compile (inductor); falls back to eager with a warning if "
                          "compiling fails. Default: for pretraining (fixed-shape blocks), on when the run's eager "
                          "length, estimated from its FLOPs, exceeds about 2 minutes, which compiling repays; off for "
                          "classify, sft and dpo (batches of every length would recompile)."})

    def __post_init__(self):
        resolve_speed_settings(self, self.compile_by_default, self.why_not_compiled)
        super().__post_init__()


# ---------------------------------------------------------------------------------------------------------------------
# torch.compile with a way back


def _is_compiler_error(error: BaseException) -> bool:
    """Errors of the compiler itself (dynamo, AOTAutograd, inductor, the C++ toolchain), not of the user's input:
    dynamo re-raises errors of the model's own code as they are."""
    from torch._dynamo.exc import TorchDynamoException

    module = type(error).__module__ or ""
    return isinstance(error, TorchDynamoException) or module.startswith(("torch._inductor", "torch._dynamo"))


def compile_with_fallback(model: nn.Module, **compile_options) -> nn.Module:
    """Compile `model` in place (as `model.compile()` does: calls go through the compiled function, the module and
    its state dict stay the same object). If the compiler fails, on the first call or a later recompilation, a
    warning names the error and the model runs eagerly from then on: a slower run, never a crashed one.

    The backward graph is compiled together with the forward one (not lazily at the first `backward()`), so that its
    failures are caught here too."""
    compiled = torch.compile(model._call_impl, **compile_options)

    def call(*args, **kwargs):
        try:
            with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                return compiled(*args, **kwargs)
        except Exception as error:
            if not _is_compiler_error(error):
                raise
            cause = getattr(error, "inner_exception", None) or error  # what the backend itself raised
            first_line = (str(cause).strip().splitlines() or [""])[0][:300]
            description = f"{type(error).__name__}" + (f" from {type(cause).__name__}" if cause is not error else "")
            warnings.warn(f"torch.compile failed ({description}: {first_line}); {type(model).__name__} runs eagerly "
                          "from now on (slower, same results). Pass --torch_compile false to skip compiling.",
                          RuntimeWarning, stacklevel=2)
            model._compiled_call_impl = None
            model.hfgpt_compile_error = f"{description}: {first_line}"
            return model._call_impl(*args, **kwargs)

    model.hfgpt_compile_error = None
    model._compiled_call_impl = call
    return model


def is_compiled(model: nn.Module) -> bool:
    return getattr(model, "_compiled_call_impl", None) is not None


def uncompile(model: nn.Module) -> nn.Module:
    """Back to eager calls (and the attention kernel the model had before `attention_for_compiled_training`): after
    training, before generation or evaluation with other shapes (which would recompile for each new shape)."""
    model._compiled_call_impl = None
    previous = getattr(model, "hfgpt_attention_before_training", None)
    if previous is not None:
        model.set_attn_implementation(previous)
        model.hfgpt_attention_before_training = None
    return model


# Longest context for which attention written out as matrix products is used in compiled CPU training: its score
# matrices (batch x heads x T x T) are kept for the backward pass, which fused kernels avoid.
EAGER_ATTENTION_MAX_CONTEXT = 1024


def attention_for_compiled_training(model: nn.Module, device: torch.device) -> str | None:
    """Attention written out for compiled training where it trains faster (`compiled_attention_written_out`: on a
    CPU), up to `EAGER_ATTENTION_MAX_CONTEXT`; `uncompile` restores the model's own. Returns what was changed, for the
    start-of-run line, or None."""
    if (not compiled_attention_written_out(model, device)
            or getattr(model.config, "max_position_embeddings", 0) > EAGER_ATTENTION_MAX_CONTEXT):
        return None
    model.set_attn_implementation("eager")
    model.hfgpt_attention_before_training = "sdpa"
    return "attention written out (eager) while compiled on the CPU: faster than sdpa's CPU kernel to train"


# ---------------------------------------------------------------------------------------------------------------------
# Throughput: tokens/s and MFU in every log


class _StepTimer(TrainerCallback):
    """Seconds spent in optimizer steps (forward, backward, optimizer; not evaluation, saving or logging)."""

    def __init__(self):
        self.seconds = 0.0
        self._started = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._started is not None:
            if args.device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - self._started
            self._started = None


class SpeedMixin:
    """Put first among a Trainer's bases (`class T(SpeedMixin, MatrixWeightDecayMixin, Trainer)`).

    `reference_forwards_per_step`: extra forward passes per micro-batch that do not train (DPO's reference model)."""

    reference_forwards_per_step = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        settings = getattr(self.args, "hfgpt_speed_settings", None)
        counts = flops.count_model_parameters(self.model)
        trainable = sum(module.in_features * module.out_features for module in self.model.modules()
                        if isinstance(module, nn.Linear) and module.weight.requires_grad)
        self._flop_counts = counts
        self._trainable_fraction = min(1.0, trainable / counts.matmul) if counts.matmul else 1.0
        self._has_lm_head = getattr(self.model, "get_output_embeddings", lambda: None)() is not None
        self._dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else torch.float32
        self._peak = flops.matmul_peak(self._dtype, self.args.device)

        if getattr(self.args, "hfgpt_torch_compile", False) == "auto":
            self.args.hfgpt_torch_compile, reason = compile_pays_off(self._eager_seconds_estimate())
            if settings is not None:
                settings.torch_compile, settings.compile_reason = self.args.hfgpt_torch_compile, reason
        self._onednn, onednn_reason = self._linears_through_onednn()
        notes = [f"fp32 linear layers through oneDNN: {onednn_reason}"] if self._onednn else []
        if getattr(self.args, "hfgpt_torch_compile", False) is True:
            notes.append(attention_for_compiled_training(self.model, self.args.device))
            compile_with_fallback(self.model, **getattr(self.args, "hfgpt_compile_options", {}))
        self._timer = _StepTimer()
        self.add_callback(self._timer)
        self._tokens = self._flops = 0  # since the start of training
        self._logged = (0, 0, 0.0)  # tokens, FLOPs and step seconds at the previous log
        if settings is not None and self.args.process_index == 0:
            notes = [note for note in notes if note]
            print(settings.describe() + (f" ({'; '.join(notes)})" if notes else ""))

    def _linears_through_onednn(self) -> tuple[bool, str]:
        """fp32 training on a CPU computes its linear layers through oneDNN where `hfgpt.onednn` measured it faster
        than MKL (the `small` shape's training step: 1.4-1.7x); not under autocast (bf16 already goes through oneDNN)
        nor in sharded runs (FSDP's and DeepSpeed's own parameter handling)."""
        if self._dtype != torch.float32 or getattr(self, "is_fsdp_enabled", False) \
                or getattr(self, "is_deepspeed_enabled", False):
            return False, ""
        return onednn_available(self.args.device)

    @contextlib.contextmanager
    def _linear_kernels(self) -> Iterator[None]:
        """The policy's layers, and a DPO reference model's (its forwards are a third of a DPO step's work), routed
        through oneDNN for the block in fp32 runs where it is faster."""
        with contextlib.ExitStack() as blocks:
            if self._onednn:
                for model in (self.model, getattr(self, "ref_model", None)):
                    if isinstance(model, nn.Module):
                        blocks.enter_context(onednn_training_linears(model))
            yield

    def train(self, *args, **kwargs):
        with self._linear_kernels():
            return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with self._linear_kernels():  # inside train() an enclosing block already routes the layers
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._linear_kernels():
            return super().predict(*args, **kwargs)

    def _eager_seconds_estimate(self) -> float | None:
        """The run's training time without compilation, from its FLOPs (planned steps x tokens per step x FLOPs per
        token) at `EAGER_MFU_ESTIMATE` of the matmul peak; None when the data has no length."""
        args = self.args
        try:
            rows = len(self.train_dataset)
            seq_len = len(self.train_dataset[0]["input_ids"])
        except (TypeError, KeyError, IndexError):
            return None
        rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        steps = args.max_steps if args.max_steps > 0 else math.ceil(rows / rows_per_step) * args.num_train_epochs
        per_token = flops.training_flops_per_token(self.model.config, seq_len, self._has_lm_head,
                                                   self._trainable_fraction, self._flop_counts)
        tokens_per_device = steps * rows_per_step * seq_len / args.world_size
        return tokens_per_device * per_token / (self._peak * EAGER_MFU_ESTIMATE)

    def floating_point_ops(self, inputs) -> int:
        """FLOPs of one micro-batch (hfgpt.flops' accounting), and its tokens counted for tokens/s. Trainer calls this
        once per micro-batch, after its forward and backward."""
        # a Mapping, not only a dict: tokenizer-padded batches (classification's collator) are BatchEncodings
        input_ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            return super().floating_point_ops(inputs)
        batch, seq_len = input_ids.shape
        config = self.model.config
        per_token = flops.training_flops_per_token(config, seq_len, self._has_lm_head, self._trainable_fraction,
                                                   self._flop_counts)
        per_token += self.reference_forwards_per_step * flops.forward_flops_per_token(
            config, seq_len, self._has_lm_head, self._flop_counts)
        self._tokens += batch * seq_len
        self._flops += batch * seq_len * per_token
        return batch * seq_len * per_token

    def _rates(self, tokens: int, flop_count: int, seconds: float) -> dict:
        if seconds <= 0 or tokens == 0:
            return {}
        world = self.args.world_size
        return {"tokens_per_second": round(tokens * world / seconds, 1),
                "mfu": round(flops.mfu(flop_count / seconds, self._peak), 4)}

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: the rates since the previous one
            tokens, flop_count, seconds = self._tokens, self._flops, self._timer.seconds
            logs.update(self._rates(tokens - self._logged[0], flop_count - self._logged[1], seconds - self._logged[2]))
            self._logged = (tokens, flop_count, seconds)
        super().log(logs, *args, **kwargs)

    def speed_summary(self, train_runtime: float | None = None) -> dict:
        """For training_summary.json: the settings, tokens/s and MFU over the training steps (and over the whole
        `train()` call, compilation and evaluations included, when its runtime is given), and how they were
        counted."""
        settings = getattr(self.args, "hfgpt_speed_settings", None)
        summary = {
            "device": str(self.args.device.type),
            "precision": "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "fp32",
            "torch_compile": getattr(self.args, "hfgpt_torch_compile", False) is True,
            "fp32_linears_through_onednn": self._onednn,
            **self._rates(self._tokens, self._flops, self._timer.seconds),
            "matmul_peak_tflops": round(self._peak / 1e12, 4),
            "training_tokens_this_session": self._tokens * self.args.world_size,
            "train_flops_this_session": float(self._flops * self.args.world_size),
        }
        if getattr(self.model, "hfgpt_compile_error", None):
            summary["torch_compile_fell_back_to_eager"] = self.model.hfgpt_compile_error
        if train_runtime:
            summary["tokens_per_second_with_overheads"] = round(self._tokens * self.args.world_size / train_runtime, 1)
        if settings is not None:
            summary["why"] = f"bf16: {settings.bf16_reason}; compile: {settings.compile_reason}"
        summary["counted_as"] = ("tokens in the training batches (padding included); FLOPs: 6N + 12LdT per token "
                                 "(hfgpt.flops), MFU against the matmul peak measured on this device in this dtype")
        return summary


__all__ = [
    "SpeedArguments",
    "SpeedMixin",
    "SpeedSettings",
    "compile_with_fallback",
    "compiler_available",
    "is_compiled",
    "uncompile",
    "native_bf16",
    "resolve_speed_settings",
    "training_device",
]

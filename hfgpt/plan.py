"""`hfgpt plan`: split a compute budget between model size and training tokens, as the scaling laws say, and turn the
answer into an hfgpt config and the `hfgpt pretrain` command that trains it.

    hfgpt plan --hours 2                       # two hours of this machine
    hfgpt plan --gpu H100 --num_gpus 8 --hours 24
    hfgpt plan --flops 1e21 | --params 124e6 | --tokens 2e9

Two answers from Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models" (Chinchilla):

- the rule: ~20 training tokens per parameter, with C = 6 N D (what their Table 3 works out to);
- the fitted law of their approach 3, L(N, D) = E + A / N^alpha + B / D^beta, minimised under C = 6 N D.

Both are printed; `--law` picks which one sizes the model (the rule by default: approaches 1 and 2 of the paper agree
with it, and the approach-3 constants as published do not reproduce the paper's own fits; Besiroglu et al., 2024,
"Chinchilla Scaling: A replication attempt", refit them and get ~20 tokens per parameter again). N counts every
parameter, embeddings included, as Chinchilla does. The loss estimate is the fitted law's: nats per token of
MassiveText under Chinchilla's tokenizer, so it says how loss moves with N and D, not the loss hfgpt will print on
other text. FLOPs of the hfgpt config itself (and so its wall time) come from `hfgpt.flops`, the one place that
counts them; only the scaling laws' own C = 6 N D is used to find the optimum, because that is how they were fitted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from .docs_smoke import scale_down

# Hoffmann et al. (2022), approach 3 (parametric fit of the final loss, nats/token)
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
TOKENS_PER_PARAMETER = 20

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), FLOP/s per GPU. Datasheet numbers: what
# the silicon can do at best, not what a training run gets (that is what --mfu is for).
GPU_BF16_PEAK = {
    "H100": 989e12,  # H100 SXM
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "RTX4090": 165e12,
}

# MFU assumptions. On this CPU hfgpt's training logs report ~25% of the bf16 peak for the `mini` shape (eager) and
# ~60% for the `small` shape compiled: the default takes the lower, the honest figure for short runs. On GPUs 40% of
# the datasheet peak is a typical well-tuned figure (PaLM reported 46%, large GPT runs 30-50%).
DEFAULT_MFU_CPU = 0.25
DEFAULT_MFU_GPU = 0.40

# Base presets the search starts from, smallest first: each fixes vocabulary, context and architecture choices; the
# search varies only layers, width and heads. `auto` takes the largest one not much bigger than the target; `tiny`
# (a 512-token vocabulary, for tests) only where even `mini`'s vocabulary would not fit the target.
BASE_PRESETS = ("mini", "small", "gpt2")
SMALLEST_PRESET = "tiny"

# Shapes considered: width/layers ("aspect ratio") within this range, where Kaplan et al. (2020, fig. 5) found the
# loss within a few percent of its best for a given N; ties go to the ratio closest to 64 (GPT-2 small, mini, small).
ASPECT_RANGE = (32, 128)
ASPECT_TARGET = 64
MAX_LAYERS = 128
MAX_WIDTH = 16384


# ---------------------------------------------------------------------------------------------------------------------
# The scaling laws (pure arithmetic, C = 6 N D as the papers count)


def chinchilla_loss(params: float, tokens: float) -> float:
    """The approach-3 fit: E (the entropy of text) + what a finite model and a finite corpus add."""
    return E + A / params**ALPHA + B / tokens**BETA


def rule_optimum(flops: float) -> tuple[float, float]:
    """20 tokens per parameter: C = 6 N (20 N) -> N = sqrt(C / 120)."""
    params = math.sqrt(flops / (6 * TOKENS_PER_PARAMETER))
    return params, TOKENS_PER_PARAMETER * params


# Minimising E + A/N^a + B/D^b under C = 6 N D gives N = G (C/6)^(b/(a+b)), D = (C/6)^(a/(a+b)) / G
_G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
_N_EXPONENT = BETA / (ALPHA + BETA)
_D_EXPONENT = ALPHA / (ALPHA + BETA)


def fit_optimum(flops: float) -> tuple[float, float]:
    """The approach-3 law's compute-optimal (N, D) for a budget of `flops`."""
    return _G * (flops / 6) ** _N_EXPONENT, (flops / 6) ** _D_EXPONENT / _G


def fit_flops_for_params(params: float) -> float:
    """The budget for which the fitted law makes `params` optimal (the inverse of fit_optimum's N)."""
    return 6 * (params / _G) ** (1 / _N_EXPONENT)


def fit_flops_for_tokens(tokens: float) -> float:
    return 6 * (tokens * _G) ** (1 / _D_EXPONENT)


def optimum(law: str, flops: float | None = None, params: float | None = None,
            tokens: float | None = None) -> tuple[float, float]:
    """(N, D) the law calls optimal, from exactly one of a budget, a parameter count or a token count."""
    if law == "rule":
        if flops is not None:
            return rule_optimum(flops)
        if params is not None:
            return params, TOKENS_PER_PARAMETER * params
        return tokens / TOKENS_PER_PARAMETER, tokens
    if flops is None:
        flops = fit_flops_for_params(params) if params is not None else fit_flops_for_tokens(tokens)
    n, d = fit_optimum(flops)
    # given N or D exactly: keep it exact rather than round-tripping through the budget
    return (params, d) if params is not None else (n, tokens) if tokens is not None else (n, d)


# ---------------------------------------------------------------------------------------------------------------------
# Hardware


def machine_peak() -> tuple[float, str]:
    """The measured matmul peak of this machine in the dtype hfgpt would train in here (bf16 where native)."""
    import torch

    from .flops import matmul_peak
    from .hardware import native_bf16

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16, _ = native_bf16(device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    name = "this machine's GPU" if device.type == "cuda" else "this machine's CPU"
    return matmul_peak(dtype, device), f"{name}, measured {str(dtype).removeprefix('torch.')} matmul peak"


def gpu_peak(gpu: str) -> float:
    key = gpu.upper().replace(" ", "").replace("-", "")
    if key not in GPU_BF16_PEAK:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPU_BF16_PEAK)}")
    return GPU_BF16_PEAK[key]


# ---------------------------------------------------------------------------------------------------------------------
# The nearest hfgpt config


@dataclasses.dataclass(frozen=True)
class Shape:
    preset: str
    layers: int
    width: int
    heads: int
    kv_heads: int | None  # set only where the preset uses grouped-query attention
    params: int  # exact, every parameter (hfgpt.flops.count_parameters)

    @property
    def overrides(self) -> dict:
        overrides = dict(num_hidden_layers=self.layers, hidden_size=self.width, num_attention_heads=self.heads)
        if self.kv_heads is not None:
            overrides["num_key_value_heads"] = self.kv_heads
        return overrides

    def config(self):
        from .configuration_hfgpt import HFGPTConfig

        return HFGPTConfig.from_preset(self.preset, **self.overrides)


def _preset_config(preset: str):
    from .configuration_hfgpt import HFGPTConfig

    return HFGPTConfig.from_preset(preset)


def choose_preset(target_params: float) -> str:
    """The largest base preset at most 10% bigger than the target (its vocabulary and context suit models of that
    size); `tiny` where the smallest `mini`-shaped model is still more than 25% too big."""
    from .flops import count_parameters

    chosen = BASE_PRESETS[0]
    for preset in BASE_PRESETS:
        if count_parameters(_preset_config(preset)).total <= 1.1 * target_params:
            chosen = preset
    if chosen == BASE_PRESETS[0] and nearest_shape(target_params, chosen).params > 1.25 * target_params:
        chosen = SMALLEST_PRESET
    return chosen


def nearest_shape(target_params: float, preset: str) -> Shape:
    """The (layers, width, heads) of `preset` whose exact parameter count is closest to the target (in ratio).

    Heads keep the preset's head size; a grouped-query preset keeps its query heads per key/value head. Parameters
    grow linearly with the layers at a given width, so two counts per width (1 and 2 layers, models built on the meta
    device) give every depth exactly."""
    from .flops import count_parameters

    base = _preset_config(preset)
    head_dim = base.hidden_size // base.num_attention_heads
    kv = getattr(base, "num_key_value_heads", None) or base.num_attention_heads
    group = base.num_attention_heads // kv
    step = head_dim * group

    def count(width: int, layers: int) -> int:
        heads = width // head_dim
        kv_heads = heads // group if group > 1 else None
        overrides = dict(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads)
        if kv_heads is not None:
            overrides["num_key_value_heads"] = kv_heads
        return count_parameters(type(base).from_preset(preset, **overrides)).total

    best, best_key = None, None
    for width in range(step, MAX_WIDTH + 1, step):
        one = count(width, 1)
        if one > 4 * target_params:
            break  # wider only gets bigger
        per_layer = count(width, 2) - one
        min_layers = max(1, math.ceil(width / ASPECT_RANGE[1]))
        max_layers = min(MAX_LAYERS, max(1, width // ASPECT_RANGE[0]))
        # the best depth at this width is one of the two around the target
        ideal = 1 + (target_params - one) / per_layer
        for layers in {min(max(math.floor(ideal), min_layers), max_layers),
                       min(max(math.ceil(ideal), min_layers), max_layers)}:
            params = one + (layers - 1) * per_layer
            key = (round(abs(math.log(params / target_params)), 3), abs(math.log(width / layers / ASPECT_TARGET)))
            if best_key is None or key < best_key:
                heads = width // head_dim
                best = Shape(preset, layers, width, heads, heads // group if group > 1 else None, params)
                best_key = key
    if best is None:
        raise ValueError(f"no {preset} shape near {target_params:.3g} parameters")
    # the linear count is exact by construction; recount the winner anyway from the config itself
    exact = count_parameters(best.config()).total
    return dataclasses.replace(best, params=exact)


# ---------------------------------------------------------------------------------------------------------------------
# The plan


class PlanError(ValueError):
    """A request no hfgpt model can satisfy (a budget below the smallest model's)."""


@dataclasses.dataclass
class Plan:
    law: str
    budget_flops: float | None  # the budget given (FLOPs, hours x peak x MFU), if one was
    hardware: str
    peak_flops: float  # per device
    devices: int
    mfu: float
    rule: tuple[float, float]  # (N, D) of the 20 tokens/parameter rule
    fit: tuple[float, float]  # (N, D) of the approach-3 law
    preset: str
    layers: int
    width: int
    heads: int
    kv_heads: int | None
    params: int  # the hfgpt config's exact count
    flops_per_token: int  # hfgpt.flops.training_flops_per_token at block_size
    block_size: int
    tokens: int  # tokens the hfgpt config trains on
    train_flops: float
    hours: float
    loss: float  # the approach-3 fit at (params, tokens)
    batch_size: int
    gradient_accumulation_steps: int
    max_steps: int
    command: str
    notes: list[str]


def smallest_model_flops() -> tuple[int, float]:
    """The smallest hfgpt model (the `tiny` preset) and the budget that trains it on 20 tokens per parameter."""
    from .flops import count_parameters, training_flops_per_token

    config = _preset_config(SMALLEST_PRESET)
    counts = count_parameters(config)
    per_token = training_flops_per_token(config, config.max_position_embeddings, counts=counts)
    return counts.total, per_token * TOKENS_PER_PARAMETER * counts.total


def make_plan(*, flops: float | None = None, params: float | None = None, tokens: float | None = None,
              law: str = "rule", peak: float, hardware: str, devices: int = 1, mfu: float,
              preset: str = "auto", block_size: int | None = None, batch_size: int = 16,
              gradient_accumulation_steps: int = 1) -> Plan:
    """Everything `hfgpt plan` prints, from exactly one of `flops`, `params`, `tokens`."""
    from .flops import count_parameters, training_flops_per_token

    if sum(x is not None for x in (flops, params, tokens)) != 1:
        raise ValueError("give exactly one of flops, params, tokens")
    smallest_params, smallest_flops = smallest_model_flops()
    if flops is not None and flops < smallest_flops:
        raise PlanError(f"a budget of {flops:.3g} FLOPs is smaller than the smallest hfgpt model needs: the "
                        f"`{SMALLEST_PRESET}` preset ({smallest_params:,} parameters) takes {smallest_flops:.3g} FLOPs "
                        f"for {TOKENS_PER_PARAMETER} tokens per parameter")
    if params is not None and params < smallest_params:
        raise PlanError(f"{params:,.0f} parameters is smaller than the smallest hfgpt model, the `{SMALLEST_PRESET}` "
                        f"preset ({smallest_params:,} parameters)")
    if tokens is not None and tokens / TOKENS_PER_PARAMETER < smallest_params:
        raise PlanError(f"{tokens:,.0f} tokens is optimal for {tokens / TOKENS_PER_PARAMETER:,.0f} parameters, smaller "
                        f"than the smallest hfgpt model, the `{SMALLEST_PRESET}` preset ({smallest_params:,})")

    rule = optimum("rule", flops, params, tokens)
    fit = optimum("fit", flops, params, tokens)
    target_params, target_tokens = rule if law == "rule" else fit

    preset = choose_preset(target_params) if preset == "auto" else preset
    shape = nearest_shape(target_params, preset)
    config = shape.config()
    block_size = block_size or config.max_position_embeddings
    if block_size > config.max_position_embeddings:
        raise ValueError(f"block_size {block_size} is above the {preset} preset's context "
                         f"({config.max_position_embeddings})")
    counts = count_parameters(config)
    per_token = training_flops_per_token(config, block_size, counts=counts)

    notes = []
    if flops is not None:
        # spend the budget on the config actually chosen, counted as hfgpt counts it (attention and head included)
        train_tokens = int(flops / per_token)
    elif params is not None:
        # the given size is the target; the tokens follow the law for the config's exact size
        train_tokens = int(optimum(law, params=counts.total)[1])
    else:
        train_tokens = int(tokens)
    tokens_per_step = batch_size * gradient_accumulation_steps * devices * block_size
    max_steps = max(1, math.ceil(train_tokens / tokens_per_step))
    if max_steps < 100:
        notes.append(f"only {max_steps} steps of {tokens_per_step:,} tokens: a smaller --batch_size gives the "
                     f"optimizer more updates")
    train_flops = per_token * train_tokens
    hours = train_flops / (peak * devices * mfu) / 3600
    loss = chinchilla_loss(counts.total, train_tokens)

    overrides = ",".join(f"{key}={value}" for key, value in shape.overrides.items())
    arguments = (f"--preset {preset} --config_overrides \"{overrides}\" --block_size {block_size} "
                 f"--per_device_train_batch_size {batch_size} --gradient_accumulation_steps "
                 f"{gradient_accumulation_steps} --max_steps {max_steps}")
    command = f"hfgpt pretrain {arguments}"
    if devices > 1:
        command = (f"accelerate launch --config_file train/accelerate/ddp.yaml --num_processes {devices} "
                   f"train/pretrain.py {arguments}")
    if not 70e6 <= counts.total <= 16e9:
        notes.append("the loss estimate extrapolates: Chinchilla fitted it on models of 70M to 16B parameters")
    notes.append("a corpus of at least the planned tokens is assumed (--train_file / --dataset_name); fewer means "
                 "repeating it, which the laws do not model")
    return Plan(law=law, budget_flops=flops, hardware=hardware, peak_flops=peak, devices=devices, mfu=mfu,
                rule=rule, fit=fit, preset=preset, layers=shape.layers, width=shape.width, heads=shape.heads,
                kv_heads=shape.kv_heads, params=counts.total, flops_per_token=per_token, block_size=block_size,
                tokens=train_tokens, train_flops=train_flops, hours=hours, loss=loss, batch_size=batch_size,
                gradient_accumulation_steps=gradient_accumulation_steps, max_steps=max_steps, command=command,
                notes=notes)


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.1f} minutes"
    if hours < 48:
        return f"{hours:.1f} hours"
    return f"{hours / 24:.1f} days"


def format_plan(plan: Plan) -> str:
    chosen = {"rule": "the 20 tokens/parameter rule", "fit": "the approach-3 fitted law"}[plan.law]
    lines = []
    if plan.budget_flops is not None:
        lines.append(f"Budget: {plan.budget_flops:.3g} FLOPs")
    lines += [
        "Compute-optimal (Hoffmann et al. 2022, C = 6 N D, N = all parameters):",
        f"  20 tokens/parameter rule:       N = {_si(plan.rule[0])} parameters, D = {_si(plan.rule[1])} tokens"
        + ("   <- used" if plan.law == "rule" else ""),
        f"  approach-3 fit L(N,D) = {E} + {A}/N^{ALPHA} + {B}/D^{BETA}: N = {_si(plan.fit[0])} parameters, "
        f"D = {_si(plan.fit[1])} tokens" + ("   <- used" if plan.law == "fit" else ""),
        f"Nearest hfgpt config (sized by {chosen}): preset {plan.preset}, {plan.layers} layers, width {plan.width}, "
        f"{plan.heads} heads" + (f" ({plan.kv_heads} key/value heads)" if plan.kv_heads else ""),
        f"  {plan.params:,} parameters; {plan.flops_per_token:,} training FLOPs per token at block size "
        f"{plan.block_size} (hfgpt.flops: 6N + 12LdT)",
        f"  trains on {plan.tokens:,} tokens ({plan.tokens / plan.params:.1f} per parameter): {plan.train_flops:.3g} "
        f"FLOPs",
        f"Estimated wall time: {_duration(plan.hours)} on {plan.devices} x {plan.hardware} "
        f"({plan.peak_flops / 1e12:.3g} TFLOP/s each) at {plan.mfu:.0%} MFU",
        f"Estimated loss: {plan.loss:.2f} nats/token (the approach-3 fit: Chinchilla's corpus and tokenizer, a guide "
        f"to the trend, not the loss hfgpt will print on your text)",
        "Run it (add your data: --train_file or --dataset_name):",
        f"  {plan.command}",
    ]
    lines += [f"Note: {note}" for note in plan.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def _positive_int(text: str) -> int:
    value = _positive(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number")
    return int(value)


def _fraction(text: str) -> float:
    value = _positive(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction in (0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .configuration_hfgpt import HFGPTConfig

    parser = argparse.ArgumentParser(
        prog="hfgpt plan",
        description="Plan a compute-optimal pretraining run (Chinchilla scaling laws): from a compute budget, a "
                    "parameter count or a token count, the model size and tokens, the nearest hfgpt config, its "
                    "wall time and loss, and the `hfgpt pretrain` command that runs it.")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--flops", type=_positive, help="compute budget in FLOPs, e.g. 1e18")
    given.add_argument("--hours", type=_positive,
                       help="compute budget in hours: of this machine at its measured matmul peak, or of --gpu")
    given.add_argument("--params", type=_positive, help="model size (all parameters), e.g. 124e6")
    given.add_argument("--tokens", type=_positive, help="training tokens, e.g. 2e9")
    parser.add_argument("--gpu", help=f"plan for GPUs rather than this machine: {', '.join(GPU_BF16_PEAK)} (dense "
                                      f"bf16 datasheet peaks)")
    parser.add_argument("--num_gpus", type=_positive_int, default=None, help="how many --gpu (default 1)")
    parser.add_argument("--mfu", type=_fraction, default=None,
                        help=f"model FLOPs utilisation assumed (default {DEFAULT_MFU_CPU} on this machine, as hfgpt "
                             f"measures for `mini` eager (~0.6 for `small` compiled); {DEFAULT_MFU_GPU} of a GPU's "
                             f"datasheet peak)")
    parser.add_argument("--law", choices=("rule", "fit"), default="rule",
                        help="what sizes the model: rule = 20 tokens per parameter (default), fit = the approach-3 "
                             "fitted loss L(N, D)")
    parser.add_argument("--preset", default="auto", choices=("auto", *HFGPTConfig.presets()),
                        help="the preset whose vocabulary, context and architecture the config keeps (auto: the "
                             "largest of mini/small/gpt2 not much bigger than the target)")
    parser.add_argument("--block_size", type=_positive_int, default=None, help="tokens per block (default: the "
                                                                                "preset's context)")
    parser.add_argument("--batch_size", type=_positive_int, default=16, help="blocks per device per step (16)")
    parser.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_gpus is not None and args.gpu is None:
        parser.error("--num_gpus needs --gpu (which GPU)")
    scale_down("hfgpt plan", args)
    if args.gpu is not None:
        try:
            peak = gpu_peak(args.gpu)
        except ValueError as error:
            parser.error(f"--gpu: {error}")
        hardware, devices, mfu = f"{args.gpu.upper()} (datasheet dense bf16)", args.num_gpus or 1, args.mfu or DEFAULT_MFU_GPU
    else:
        peak, hardware = machine_peak()
        devices, mfu = 1, args.mfu or DEFAULT_MFU_CPU

    flops = args.flops
    if args.hours is not None:
        flops = args.hours * 3600 * peak * devices * mfu
    try:
        plan = make_plan(flops=flops, params=args.params, tokens=args.tokens, law=args.law, peak=peak,
                         hardware=hardware, devices=devices, mfu=mfu, preset=args.preset, block_size=args.block_size,
                         batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps)
    except PlanError as error:
        print(f"hfgpt plan: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        parser.error(str(error))
    print(json.dumps(dataclasses.asdict(plan), indent=2) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())

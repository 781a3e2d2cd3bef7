"""Speed of hfgpt against transformers' GPT2LMHeadModel at equal shapes, measured in the same process.

Both models get the same config (hfgpt's GPT-2-equivalent switches: learned positions, pre-norm LayerNorm, gelu_new,
biases, tied embeddings, no dropout), the same weights (converted with hfgpt.convert), the sdpa attention, the same
data and the optimizer Trainer uses by default (fused AdamW). Measured, as tokens per second:

    train        forward + backward + optimizer step on a (batch, context) block; tokens = batch * context, in:
                   fp32 eager      both models as they come
                   bf16 eager      both under torch.autocast(bfloat16), as Trainer's --bf16 runs them
                   hfgpt default   hfgpt as `hfgpt pretrain` trains it on this hardware: bf16 where the device computes
                                   it natively, torch.compile where a compiler is available (hfgpt.hardware)
                   hfgpt fp32 ... oneDNN   as `hfgpt pretrain --bf16 false` trains it (compiled, and with
                                   --torch_compile false eager) where oneDNN's fp32 products are faster (hfgpt.onednn)
    generate bN  greedy decoding of N prompts (tokens = N * new tokens): GPT-2's `generate()` (fp32) against hfgpt
                 as it decodes (hfgpt.generation.generate: eager and with the compiled static-cache step, oneDNN
                 linears on x86 CPUs, hfgpt.onednn), whose tokens are checked against hfgpt's own `generate()` and
                 GPT-2's, and against hfgpt with int8 weights (hfgpt.quantization, as `hfgpt chat --quantize int8`
                 decodes), eager and compiled, whose tokens are compared with fp32's
    memory       peak resident memory (VmHWM) of a process during training steps, one fresh process per setting

Runs alternate between the settings after a warm-up (which includes compilation; its time is printed), and the table
gives medians over the repeats, the ratio of the medians (> 1: hfgpt is faster) with the range of per-repeat ratios,
and each side's model FLOPs utilisation (hfgpt.flops: 6N + 12LdT per trained token) against the fp32 and the bf16
matmul peaks measured in the same run. A benchmark, not a test: nothing is asserted about speed.

    python bench/model_speed.py              # the `small` shape (the README's table)
    python bench/model_speed.py --quick      # a short run (smaller batch, fewer repeats, no memory processes)
    python bench/model_speed.py --shapes tiny small-gpt2vocab --threads 1 --timer cpu   # on a busy shared CPU
    python bench/model_speed.py --device cuda --shapes gpt2 --train_batch 16 --no_generate  # the GPU MFU target
    python bench/model_speed.py --shapes gpt2 --no_train --repeats 3   # decoding at GPT-2 small's shape (124M)

On a busy shared CPU, elapsed (wall) time mostly measures the other processes (check `uptime` first). `--threads 1
--timer cpu` counts only this process's CPU time; the per-run range column shows what noise remains.
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from hfgpt import HFGPTConfig, HFGPTForCausalLM, flops
from hfgpt.convert.gpt2 import gpt2_config_from_hfgpt, gpt2_state_dict_from_hfgpt
from hfgpt.generation import generate as compiled_generate
from hfgpt.hardware import compiler_available, native_bf16
from hfgpt.onednn import onednn_available, onednn_training_linears
from hfgpt.quantization import quantize_int8
from hfgpt.training.speed import attention_for_compiled_training, compile_with_fallback

GPT2_VOCAB = 50257
# name -> HFGPTConfig keyword arguments. Dropout is off in both models so training steps do the same work.
SHAPES = {
    "tiny": dict(preset="tiny"),
    "small": dict(preset="small"),  # 6 layers, width 384, 6 heads, context 256, vocabulary 8,192
    "small-gpt2vocab": dict(preset="small", vocab_size=GPT2_VOCAB),
    "mini": dict(preset="mini"),  # the main job's model (`hfgpt pretrain` with no arguments)
    "gpt2": dict(preset="gpt2"),  # 124M, context 1024: the GPU target's shape (bench/gpu_checks.sh)
}


@dataclasses.dataclass
class Workload:
    train_batch: int
    generate_batches: tuple[int, ...]
    prompt_length: int
    new_tokens: int
    repeats: int
    warmup: int
    min_seconds: float  # shortest measurement
    memory: bool


FULL = Workload(train_batch=4, generate_batches=(1, 4), prompt_length=16, new_tokens=48, repeats=5, warmup=2,
                min_seconds=1.0, memory=True)
QUICK = Workload(train_batch=2, generate_batches=(1, 4), prompt_length=16, new_tokens=24, repeats=3, warmup=2,
                 min_seconds=0.3, memory=False)

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclasses.dataclass(frozen=True)
class Setting:
    model: str  # hfgpt | gpt2
    bf16: bool
    compiled: bool
    onednn: bool = False  # fp32 linear layers through oneDNN, as hfgpt's Trainers run fp32 on CPUs where it is faster

    @property
    def name(self) -> str:
        return (f"{self.model} {'bf16' if self.bf16 else 'fp32'}{' compiled' if self.compiled else ''}"
                f"{' oneDNN' if self.onednn else ''}")


def hfgpt_default_setting(device: torch.device, bf16: bool | None = None) -> Setting:
    """What `hfgpt pretrain` picks on this hardware (hfgpt.training.speed.resolve_speed_settings), or with
    `--bf16 false` when `bf16` is False."""
    bf16 = native_bf16(device)[0] if bf16 is None else bf16
    return Setting("hfgpt", bf16, compiler_available(device)[0], not bf16 and onednn_available(device)[0])


def build_config(shape: dict) -> HFGPTConfig:
    overrides = {key: value for key, value in shape.items() if key != "preset"}
    return HFGPTConfig.from_preset(shape["preset"], embedding_dropout=0.0, attention_dropout=0.0,
                                   residual_dropout=0.0, bos_token_id=0, eos_token_id=0, **overrides)


def build_models(config: HFGPTConfig, device: torch.device) -> dict[str, torch.nn.Module]:
    """hfgpt and GPT-2 with the same config and the same weights, both on sdpa attention."""
    torch.manual_seed(0)
    hfgpt = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    gpt2 = AutoModelForCausalLM.from_config(gpt2_config_from_hfgpt(config), attn_implementation="sdpa")
    gpt2.load_state_dict(gpt2_state_dict_from_hfgpt(hfgpt.state_dict(), config.num_hidden_layers))
    assert isinstance(hfgpt, HFGPTForCausalLM) and isinstance(gpt2, GPT2LMHeadModel)
    models = {"hfgpt": hfgpt.to(device), "gpt2": gpt2.to(device)}
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    if counts["hfgpt"] != counts["gpt2"]:  # the comparison would be meaningless
        raise RuntimeError(f"Parameter counts differ: {counts}")
    return models


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_runner(model, setting: Setting, batch: int, length: int, device) -> Callable[[], int]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(device)
    model.train()
    routing = contextlib.ExitStack()  # held by step: the layers stay routed while it lives, as for a whole train()
    if setting.onednn:
        routing.enter_context(onednn_training_linears(model))
    if setting.compiled:  # as hfgpt's Trainer compiles a model (hfgpt.training.speed.SpeedMixin)
        attention_for_compiled_training(model, device)
        compile_with_fallback(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> int:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting.bf16):
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch * length

    step.routing = routing
    return step


def greedy_inputs(vocab_size: int, batch: int, prompt_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths (left padding) when batch > 1, as real batched decoding has them."""
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1, vocab_size, (batch, prompt_length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, batch):
        attention_mask[row, : row * 2] = 0
    return input_ids.masked_fill(attention_mask == 0, 0).to(device), attention_mask.to(device)


def generate_runner(model, compiled: bool | None, batch: int, prompt_length: int, new_tokens: int, device,
                    outputs: dict, label: str) -> Callable[[], int]:
    """Greedy decoding of `batch` prompts by hfgpt.generation.generate (`compiled` None: the model's own
    `generate()`, as it comes); the last output is kept in `outputs[label]` for the token checks."""
    input_ids, attention_mask = greedy_inputs(model.config.vocab_size, batch, prompt_length, device)
    model.eval()
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, eos_token_id=None, pad_token_id=0)

    @torch.no_grad()
    def run() -> int:
        if compiled is None:
            output = model.generate(input_ids, **kwargs)
        else:
            output = compiled_generate(model, input_ids, compiled=compiled, **kwargs)
        outputs[label] = output.cpu()
        return batch * (output.shape[1] - prompt_length)

    return run


def training_rows(models: dict, hfgpt_settings: list[Setting], workload: Workload, length: int, device, clock,
                  peaks: dict, train_flops: float) -> list[tuple[str, ...]]:
    """Training steps: both models in fp32 and bf16 as they come, and `hfgpt_settings` (hfgpt's default here, then
    fp32 as hfgpt trains it); prints every setting's rate and MFU, returns the comparison rows against GPT-2."""
    default, *fp32_settings = hfgpt_settings
    settings = [Setting("hfgpt", False, False), Setting("gpt2", False, False), Setting("hfgpt", True, False),
                Setting("gpt2", True, False)]
    settings += [setting for setting in hfgpt_settings if setting not in settings]
    # every setting on its own copy of the same weights
    runners = {setting.name: train_step_runner(copy.deepcopy(models[setting.model]), setting, workload.train_batch,
                                               length, device) for setting in settings}
    rates, warmups = measure(runners, workload.repeats, workload.warmup, workload.min_seconds, clock, device)
    medians = {name: statistics.median(values) for name, values in rates.items()}

    def mfu_cells(name: str) -> tuple[str, str]:
        achieved = medians[name] * train_flops
        return f"{achieved / peaks[torch.float32]:.1%}", f"{achieved / peaks[torch.bfloat16]:.1%}"

    print("\n  training settings (tokens/s; MFU against the fp32 and the bf16 peak; warm-up seconds)")
    print_table(("setting", "", "tok/s", "MFU fp32 peak", "MFU bf16 peak", "warm-up s"),
                [(name, "", f"{medians[name]:,.0f}", *mfu_cells(name), f"{warmups[name]:.1f}") for name in runners])
    comparisons = [(Setting("hfgpt", False, False), Setting("gpt2", False, False)),
                   (Setting("hfgpt", True, False), Setting("gpt2", True, False)),
                   (default, Setting("gpt2", False, False)),
                   (default, Setting("gpt2", True, False))]
    comparisons += [(setting, Setting("gpt2", False, False)) for setting in fp32_settings]
    rows = []
    for ours, theirs in comparisons:
        per_repeat = [a / b for a, b in zip(rates[ours.name], rates[theirs.name])]
        rows.append((f"train {ours.name}", f"vs {theirs.name}", f"{medians[ours.name]:,.0f}",
                     f"{medians[theirs.name]:,.0f}", f"{medians[ours.name] / medians[theirs.name]:.2f}",
                     f"{min(per_repeat):.2f}-{max(per_repeat):.2f}"))
    return rows


def token_agreement(ours: torch.Tensor, reference: torch.Tensor, prompt_length: int) -> float:
    """Fraction of generated positions where two greedy decodings chose the same token."""
    return (ours[:, prompt_length:] == reference[:, prompt_length:]).float().mean().item()


def measure(runners: dict[str, Callable[[], int]], repeats: int, warmup: int, min_seconds: float,
            clock: Callable[[], float], device) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Tokens/s of each runner over `repeats` alternating measurements, after `warmup` unmeasured runs of each (whose
    seconds are returned: the first includes compilation). A measurement calls its runner until `min_seconds` have
    passed on `clock`, so that millisecond-long runs (tiny models) are not dominated by timer noise."""
    warmup_seconds = {}
    for name, run in runners.items():
        start = time.perf_counter()
        for _ in range(warmup):
            run()
        _sync(device)
        warmup_seconds[name] = time.perf_counter() - start
    names = list(runners)
    rates = {name: [] for name in names}
    for repeat in range(repeats):
        order = names if repeat % 2 == 0 else names[::-1]  # no setting always runs first
        for name in order:
            tokens, elapsed = 0, 0.0
            _sync(device)
            start = clock()
            while elapsed < min_seconds or tokens == 0:
                tokens += runners[name]()
                _sync(device)
                elapsed = clock() - start
            rates[name].append(tokens / elapsed)
    return rates, warmup_seconds


# --- memory: one fresh process per setting ----------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(shape_name: str, setting: Setting, batch: int, device: torch.device) -> float:
    """Peak memory (MB) over training steps after warm-up (compilation's own peak is not the step's): build the model,
    warm up, reset the peak, run steps, read it. CPU: resident memory (VmHWM, reset through /proc/self/clear_refs);
    GPU: torch.cuda.max_memory_allocated."""
    config = build_config(SHAPES[shape_name])
    model = build_models(config, device)[setting.model]
    step = train_step_runner(model, setting, batch, config.max_position_embeddings, device)
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _peak_rss_mb()


def measure_memory(shape_name: str, settings: list[Setting], batch: int, threads: int, device) -> dict[str, float]:
    if device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        print("  memory: skipped (needs Linux's /proc/self/clear_refs)")
        return {}
    peaks = {}
    for setting in settings:
        command = [sys.executable, __file__, "--_memory_child", json.dumps([shape_name, dataclasses.asdict(setting),
                                                                          batch, threads, str(device)])]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(f"  memory {setting.name}: failed\n{result.stderr[-2000:]}")
            continue
        peaks[setting.name] = float(result.stdout.strip().splitlines()[-1])
    return peaks


# --- the report -------------------------------------------------------------------------------------------------------


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: int = 2) -> None:
    table = [header] + rows
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(width) if j < left else cell.rjust(width)
                        for j, (cell, width) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * width for width in widths))


# hfgpt's decoding settings, each against GPT-2's generate() in fp32: (label, quantized, compiled)
# label, int8 weights, compiled: as hfgpt decodes (hfgpt.generation: oneDNN linears on x86 CPUs, hfgpt.onednn)
DECODING = [("fp32", False, False), ("fp32 compiled", False, True), ("int8", True, False),
            ("int8 compiled", True, True)]


def decoding_rows(models: dict, workload: Workload, device, clock) -> list[tuple[str, ...]]:
    """Greedy decoding, hfgpt's settings against GPT-2's `generate()`. fp32 must give exactly the tokens of hfgpt's
    and GPT-2's `generate()` (eager and compiled); int8 weights (hfgpt.quantization) change the logits slightly, so
    for them the share of tokens equal to fp32's is printed instead (random weights make near-ties common: a trained
    model agrees more, see bench/quantization.py)."""
    int8 = quantize_int8(copy.deepcopy(models["hfgpt"]))
    rows = []
    for batch in workload.generate_batches:
        outputs = {}
        run = functools.partial(generate_runner, batch=batch, prompt_length=workload.prompt_length,
                                new_tokens=workload.new_tokens, device=device, outputs=outputs)
        runners = {"gpt2": run(models["gpt2"], None, label="gpt2")}
        for label, quantized, compiled in DECODING:
            runners[label] = run(int8 if quantized else models["hfgpt"], compiled, label=label)
        rates, warmups = measure(runners, workload.repeats, workload.warmup, workload.min_seconds, clock, device)
        run(models["hfgpt"], None, label="own")()  # hfgpt's own generate(), for the token checks
        identical = {label: (torch.equal(outputs[label], outputs["own"]), torch.equal(outputs[label], outputs["gpt2"]))
                     for label in ("fp32", "fp32 compiled")}
        gpt2_rate = statistics.median(rates["gpt2"])
        for label, _, _ in DECODING:
            per_repeat = [a / b for a, b in zip(rates[label], rates["gpt2"])]
            rows.append((f"generate b{batch} {workload.prompt_length}+{workload.new_tokens}",
                         f"{label} vs gpt2 fp32 generate()", f"{statistics.median(rates[label]):,.0f}",
                         f"{gpt2_rate:,.0f}", f"{statistics.median(rates[label]) / gpt2_rate:.2f}",
                         f"{min(per_repeat):.2f}-{max(per_repeat):.2f}"))
        agreement = {label: token_agreement(outputs[label], outputs["own"], workload.prompt_length)
                     for label in ("int8", "int8 compiled")}
        print(f"  generate b{batch}: compiled warm-up {warmups['fp32 compiled']:.1f} s (int8 "
              f"{warmups['int8 compiled']:.1f} s); tokens identical to hfgpt's / GPT-2's generate(): fp32 "
              f"{identical['fp32'][0]} / {identical['fp32'][1]}, fp32 compiled {identical['fp32 compiled'][0]} / "
              f"{identical['fp32 compiled'][1]}; int8 tokens equal to fp32's: {agreement['int8']:.0%} (compiled "
              f"{agreement['int8 compiled']:.0%})")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run: smaller batch, fewer repeats, no memory")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["small"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=None, help="measured runs per setting (default: 5, quick: 3)")
    parser.add_argument("--train_batch", type=int, default=None,
                        help="training rows per step (default: 4, quick: 2); a GPU needs more to be busy")
    parser.add_argument("--no_generate", action="store_true", help="skip the decoding rows")
    parser.add_argument("--no_train", action="store_true", help="skip the training rows (and the memory processes)")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument(
        "--timer", choices=list(CLOCKS), default="wall",
        help="wall: elapsed time (what a user waits). cpu: CPU time of this process, which other processes on a "
             "shared machine disturb far less; use it with --threads 1 to compare the models' work on a busy CPU.")
    parser.add_argument("--_memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._memory_child:  # a fresh process measuring one setting's peak memory
        shape_name, setting, batch, threads, device = json.loads(args._memory_child)
        torch.set_num_threads(threads)
        print(memory_child(shape_name, Setting(**setting), batch, torch.device(device)))
        return 0

    workload = QUICK if args.quick else FULL
    if args.repeats is not None:
        workload = dataclasses.replace(workload, repeats=args.repeats)
    if args.train_batch is not None:
        workload = dataclasses.replace(workload, train_batch=args.train_batch)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.timer == "cpu" and device.type != "cpu":
        parser.error("--timer cpu measures CPU work; on an accelerator use --timer wall")
    default = hfgpt_default_setting(device)
    fp32_default = hfgpt_default_setting(device, bf16=False)  # as `hfgpt pretrain --bf16 false` trains
    peaks = {dtype: flops.measure_matmul_peak(dtype, device) for dtype in (torch.float32, torch.bfloat16)}
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}) "
          f"threads={torch.get_num_threads()} torch={torch.__version__} repeats={workload.repeats} "
          f"warmup={workload.warmup} min_seconds={workload.min_seconds} timer={args.timer}")
    print(f"matmul peak measured now: fp32 {peaks[torch.float32] / 1e9:,.0f} GFLOP/s, bf16 "
          f"{peaks[torch.bfloat16] / 1e9:,.0f} GFLOP/s; hfgpt's default training here: {default.name} "
          f"({native_bf16(device)[1]}; compiler: {compiler_available(device)[1]})")

    for shape_name in args.shapes:
        config = build_config(SHAPES[shape_name])
        length = config.max_position_embeddings
        models = build_models(config, device)
        counts = flops.count_model_parameters(models["hfgpt"])
        train_flops = flops.training_flops_per_token(config, length, counts=counts)
        print(f"\n{shape_name}: {config.num_hidden_layers} layers, width {config.hidden_size}, "
              f"{config.num_attention_heads} heads, context {length}, vocab {config.vocab_size}; "
              f"{counts.total / 1e6:.2f}M parameters ({counts.non_embedding / 1e6:.2f}M non-embedding); "
              f"{train_flops / 1e6:.1f} MFLOP per trained token; train batch {workload.train_batch} x {length}")

        clock = CLOCKS[args.timer]
        # fp32 as `hfgpt pretrain --bf16 false` trains here, where that differs from the model as it comes (oneDNN
        # linears): eagerly (--torch_compile false) and compiled (the same setting where nothing compiles)
        fp32_settings = [setting for setting in dict.fromkeys((dataclasses.replace(fp32_default, compiled=False),
                                                               fp32_default)) if setting.onednn]
        rows = [] if args.no_train else training_rows(models, [default, *fp32_settings], workload, length, device,
                                                      clock, peaks, train_flops)
        if not args.no_generate:
            rows += decoding_rows(models, workload, device, clock)

        print(f"\n  {shape_name}: hfgpt against GPT-2 (ratio of medians, > 1: hfgpt faster)")
        print_table(("benchmark", "against", "hfgpt tok/s", "gpt2 tok/s", "hfgpt/gpt2", "per-run range"), rows)

        if workload.memory and not args.no_memory and not args.no_train:
            memory_settings = [default, *fp32_settings,
                               Setting("gpt2", False, False), Setting("gpt2", True, False)]
            memory = measure_memory(shape_name, memory_settings, workload.train_batch, torch.get_num_threads(),
                                    device)
            if memory:
                what = "GPU memory allocated" if device.type == "cuda" else "resident memory (RSS)"
                print(f"\n  {shape_name}: peak {what} during training steps (MB, one process each)")
                print_table(("setting", "peak MB"), [(name, f"{mb:,.0f}") for name, mb in memory.items()], 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

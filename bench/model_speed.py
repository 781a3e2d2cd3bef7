"""Speed of hfgpt against transformers' GPT2LMHeadModel at equal shapes, measured in the same process.

For each shape, both models get the same config (hfgpt's GPT-2-equivalent switches: learned positions, pre-norm
LayerNorm, gelu_new, biases, tied embeddings, no dropout), the same weights (converted with hfgpt.convert) and
the sdpa attention. Measured, as tokens per second:

    train        forward + backward + AdamW step on a (batch, context) block; tokens = batch * context
    generate bN  greedy KV-cache generation (`generate`, do_sample=False) of N prompts; tokens = N * max_new_tokens

Runs alternate between the two models (hfgpt, GPT-2, then GPT-2, hfgpt, ...) after a warm-up, and the table gives
the median over the repeats and the ratio of the medians, hfgpt / GPT-2 (> 1: hfgpt is faster), with the range of
the per-repeat ratios to show the noise. A benchmark, not a test: nothing is asserted about speed.

    python bench/model_speed.py            # both shapes, default repeats
    python bench/model_speed.py --quick    # a short run (smaller batches, fewer repeats)
    python bench/model_speed.py --threads 1 --timer cpu   # on a CPU shared with other busy processes

On a busy shared CPU, elapsed (wall) time mostly measures the other processes: several torch threads contending for
the same cores can run many times slower than one. `--threads 1 --timer cpu` counts only this process's CPU time,
which is what to compare the two implementations with there; the per-run range column shows what noise remains.
"""

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from hfgpt import HFGPTConfig, HFGPTForCausalLM
from hfgpt.convert.gpt2 import gpt2_config_from_hfgpt, gpt2_state_dict_from_hfgpt

GPT2_VOCAB = 50257
# name -> HFGPTConfig keyword arguments. Dropout is off in both models so training steps do the same work.
SHAPES = {
    "tiny": dict(preset="tiny"),
    # the `small` preset (6 layers, width 384, 6 heads, context 256) with GPT-2's vocabulary
    "small-gpt2vocab": dict(preset="small", vocab_size=GPT2_VOCAB),
}


@dataclasses.dataclass
class Workload:
    train_batch: int
    train_length: int | None  # None: the model's context
    generate_batches: tuple[int, ...]
    prompt_length: int
    new_tokens: int
    repeats: int
    warmup: int
    min_seconds: float  # shortest measurement


FULL = Workload(train_batch=4, train_length=None, generate_batches=(1, 4), prompt_length=16, new_tokens=48,
                repeats=5, warmup=2, min_seconds=1.0)
QUICK = Workload(train_batch=2, train_length=None, generate_batches=(1, 4), prompt_length=16, new_tokens=24,
                 repeats=3, warmup=1, min_seconds=0.3)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def build_models(shape: dict, device: torch.device) -> dict[str, torch.nn.Module]:
    """hfgpt and GPT-2 with the same config and the same weights, both on sdpa attention."""
    overrides = {key: value for key, value in shape.items() if key != "preset"}
    config = HFGPTConfig.from_preset(shape["preset"], embedding_dropout=0.0, attention_dropout=0.0,
                                     residual_dropout=0.0, bos_token_id=0, eos_token_id=0, **overrides)
    torch.manual_seed(0)
    hfgpt = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    gpt2_config = gpt2_config_from_hfgpt(config)
    gpt2 = AutoModelForCausalLM.from_config(gpt2_config, attn_implementation="sdpa")
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


def train_step_runner(model, batch: int, length: int, device) -> Callable[[], int]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> int:
        model.train()
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch * length

    return step


def generate_runner(model, batch: int, prompt_length: int, new_tokens: int, device) -> Callable[[], int]:
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1, model.config.vocab_size, (batch, prompt_length), generator=generator).to(device)

    @torch.no_grad()
    def run() -> int:
        model.eval()
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                                do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
        generated = output.shape[1] - prompt_length
        if generated != new_tokens:
            raise RuntimeError(f"{type(model).__name__} generated {generated} tokens, expected {new_tokens}")
        return batch * generated

    return run


def measure(runners: dict[str, Callable[[], int]], repeats: int, warmup: int, min_seconds: float,
            clock: Callable[[], float], device) -> dict[str, list[float]]:
    """Tokens/s of each runner over `repeats` alternating measurements, after `warmup` unmeasured runs of each.
    A measurement calls its runner until `min_seconds` have passed on `clock`, so that millisecond-long runs (tiny
    models) are not dominated by timer and scheduler noise."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    names = list(runners)
    rates = {name: [] for name in names}
    for repeat in range(repeats):
        order = names if repeat % 2 == 0 else names[::-1]  # neither model always runs first
        for name in order:
            tokens, elapsed = 0, 0.0
            _sync(device)
            start = clock()
            while elapsed < min_seconds or tokens == 0:
                tokens += runners[name]()
                _sync(device)
                elapsed = clock() - start
            rates[name].append(tokens / elapsed)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run: smaller batches, fewer repeats")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=None, help="measured runs per model (default: 5, quick: 3)")
    parser.add_argument(
        "--timer", choices=list(CLOCKS), default="wall",
        help="wall: elapsed time (what a user waits). cpu: CPU time of this process, which other processes on a "
             "shared machine disturb far less; use it with --threads 1 to compare the models' work on a busy CPU.")
    args = parser.parse_args(argv)

    workload = QUICK if args.quick else FULL
    if args.repeats is not None:
        workload = dataclasses.replace(workload, repeats=args.repeats)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.timer == "cpu" and device.type != "cpu":
        parser.error("--timer cpu measures CPU work; on an accelerator use --timer wall")
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} repeats={workload.repeats} "
          f"warmup={workload.warmup} min_seconds={workload.min_seconds} timer={args.timer}")

    rows = []
    for shape_name in args.shapes:
        models = build_models(SHAPES[shape_name], device)
        config = models["hfgpt"].config
        length = workload.train_length or config.max_position_embeddings
        parameters = sum(p.numel() for p in models["hfgpt"].parameters())
        print(f"\n{shape_name}: {config.num_hidden_layers} layers, width {config.hidden_size}, "
              f"{config.num_attention_heads} heads, context {config.max_position_embeddings}, vocab "
              f"{config.vocab_size}; {parameters / 1e6:.2f}M parameters in each model; attention "
              f"{', '.join(f'{name}={model.config._attn_implementation}' for name, model in models.items())}")
        benchmarks = {f"train b{workload.train_batch}x{length}": {
            name: train_step_runner(model, workload.train_batch, length, device) for name, model in models.items()}}
        for batch in workload.generate_batches:
            benchmarks[f"generate b{batch} {workload.prompt_length}+{workload.new_tokens}"] = {
                name: generate_runner(model, batch, workload.prompt_length, workload.new_tokens, device)
                for name, model in models.items()}
        for bench_name, runners in benchmarks.items():
            clock = CLOCKS[args.timer]
            rates = measure(runners, workload.repeats, workload.warmup, workload.min_seconds, clock, device)
            hfgpt, gpt2 = statistics.median(rates["hfgpt"]), statistics.median(rates["gpt2"])
            per_repeat = [a / b for a, b in zip(rates["hfgpt"], rates["gpt2"])]
            rows.append((shape_name, bench_name, hfgpt, gpt2, hfgpt / gpt2, min(per_repeat), max(per_repeat)))
            print(f"  {bench_name}: hfgpt {hfgpt:,.0f} tok/s, gpt2 {gpt2:,.0f} tok/s, ratio {hfgpt / gpt2:.3f}")

    header = ("shape", "benchmark", "hfgpt tok/s", "gpt2 tok/s", "hfgpt/gpt2", "per-run range")
    table = [header] + [(s, b, f"{h:,.0f}", f"{g:,.0f}", f"{r:.3f}", f"{lo:.2f}-{hi:.2f}")
                        for s, b, h, g, r, lo, hi in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(width) if j < 2 else cell.rjust(width)
                        for j, (cell, width) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * width for width in widths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

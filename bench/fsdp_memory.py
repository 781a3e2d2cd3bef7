"""Memory per process of FSDP2 against DDP: the same pretraining run on 2 CPU processes, under
train/accelerate/ddp.yaml and train/accelerate/fsdp.yaml.

Each process measures, through `hfgpt pretrain`'s own Trainer, what it holds itself (a sharded parameter counts its
local shard only; a tensor shared by tied weights counts once):

    parameters   the model's parameters, just before the last optimizer step
    gradients    their .grad tensors, at the same moment
    optimizer    AdamW's state (exp_avg, exp_avg_sq, step), just after that step
    RSS start    the process's resident memory when training starts (model built, sharded or wrapped; no step yet)
    peak steps   its peak resident memory during the training steps (the peak is reset when training starts):
                 Python, torch, the data, activations, DDP's gradient buckets and FSDP's transiently unsharded
                 blocks included
    peak run     its peak resident memory over the whole process (ru_maxrss), building the model included: every
                 process builds the whole model before it is sharded

The default is GPT-2's shape (`gpt2` preset, 124M parameters, 50,257-token vocabulary) in fp32, on
../shared/data/tinyshakespeare.txt, a few steps of context 128. A benchmark, not a test: nothing is asserted.

    python bench/fsdp_memory.py                              # gpt2 shape (docs/distributed.md's table)
    python bench/fsdp_memory.py --preset small --vocab_size 8192
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"DDP": "ddp.yaml", "FSDP2": "fsdp.yaml"}
MB = 1024 * 1024


def local_bytes(tensors) -> int:
    """Bytes this process holds for `tensors`: a DTensor's local shard, each storage once."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None:
            continue
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if local.data_ptr() in seen:
            continue
        seen.add(local.data_ptr())
        total += local.numel() * local.element_size()
    return total


def proc_status_bytes(field: str) -> int:
    """VmRSS (resident memory now) or VmHWM (its peak) of this process, from /proc/self/status (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux.")


def reset_peak_rss() -> None:
    """Start VmHWM afresh from the current RSS (Linux >= 4.0: writing 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(report_dir: str, pretrain_argv: list[str]) -> None:
    """Runs under `accelerate launch`: pretraining with a callback that measures this process."""
    import torch
    from transformers import TrainerCallback

    from hfgpt.training.pretrain import parse_args, prepare_pretraining

    class Measure(TrainerCallback):
        def __init__(self):
            self.report = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.report["rss_start"] = proc_status_bytes("VmRSS")
            reset_peak_rss()

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step + 1 == state.max_steps:
                self.report["parameters"] = local_bytes(model.parameters())
                self.report["gradients"] = local_bytes(p.grad for p in model.parameters())

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step + 1 == state.max_steps:
                self.report["optimizer"] = local_bytes(
                    value for per_parameter in optimizer.state.values() for value in per_parameter.values()
                    if isinstance(value, torch.Tensor))

    measure = Measure()
    run = prepare_pretraining(*parse_args(pretrain_argv), callbacks=[measure])
    run.trainer.train()
    rank = run.training_args.process_index
    measure.report["peak_rss_steps"] = proc_status_bytes("VmHWM")
    measure.report["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    measure.report["distributed_type"] = str(run.training_args.distributed_state.distributed_type.value)
    measure.report["num_parameters"] = run.summary["num_parameters"]
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(measure.report))
    from hfgpt.training.common import end_distributed

    end_distributed()


def launch(mode: str, report_dir: Path, pretrain_argv: list[str], port: int) -> list[dict]:
    report_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "train" / "accelerate" / CONFIGS[mode]), "--num_processes", "2", "--main_process_port",
               str(port), __file__, "--worker", str(report_dir), *pretrain_argv]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return [json.loads((report_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="The model's vocabulary (default: the preset's, e.g. GPT-2's 50,257, whatever the size "
                             "of the tokenizer trained on the text).")
    parser.add_argument("--train_file", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--tokenizer_vocab_size", type=int, default=2048,
                        help="Size of the BPE trained on the text (small: quick to train; the model's vocabulary "
                             "is --vocab_size).")
    parser.add_argument("--port", type=int, default=29531)
    from hfgpt import HFGPTConfig
    from hfgpt.docs_smoke import scale_down

    args = scale_down("bench/fsdp_memory.py", parser.parse_args(argv))  # the docs' tests: parse only

    vocab_size = args.vocab_size or HFGPTConfig.from_preset(args.preset).vocab_size
    results = {}
    with tempfile.TemporaryDirectory(prefix="hfgpt-fsdp-memory-") as tmp:
        for index, mode in enumerate(CONFIGS):
            pretrain_argv = [
                "--output_dir", str(Path(tmp) / mode / "out"), "--train_file", args.train_file,
                "--preset", args.preset, "--config_overrides", f"vocab_size={vocab_size}",
                "--vocab_size", str(args.tokenizer_vocab_size), "--block_size", str(args.block_size),
                "--per_device_train_batch_size", "2", "--max_steps", str(args.max_steps), "--use_cpu", "true",
                "--bf16", "false", "--torch_compile", "false", "--eval_strategy", "no", "--save_strategy", "no",
                "--report_to", "none", "--num_samples", "0", "--disable_tqdm", "true", "--logging_steps", "1",
                "--validation_split_percentage", "0"]
            results[mode] = launch(mode, Path(tmp) / mode / "reports", pretrain_argv, args.port + index)
            print(mode, json.dumps(results[mode]), flush=True)

    num_parameters = results["DDP"][0]["num_parameters"]
    print(f"\n{args.preset} shape, vocabulary {vocab_size}: {num_parameters / 1e6:.1f}M parameters, fp32, AdamW, "
          f"2 CPU processes (MB per process, the larger of the two)")
    columns = ("parameters", "gradients", "optimizer")
    print(f"{'':<6} {'parameters':>10} {'gradients':>10} {'optimizer':>10} {'sum':>8} {'RSS start':>10} "
          f"{'peak steps':>10} {'peak run':>9}  distributed")
    for mode, reports in results.items():
        worst = {key: max(report[key] for report in reports)
                 for key in (*columns, "rss_start", "peak_rss_steps", "peak_rss")}
        total = max(sum(report[key] for key in columns) for report in reports)
        print(f"{mode:<6} {worst['parameters'] / MB:>10,.0f} {worst['gradients'] / MB:>10,.0f} "
              f"{worst['optimizer'] / MB:>10,.0f} {total / MB:>8,.0f} {worst['rss_start'] / MB:>10,.0f} "
              f"{worst['peak_rss_steps'] / MB:>10,.0f} {worst['peak_rss'] / MB:>9,.0f}  {reports[0]['distributed_type']}")
    ratio = {key: max(r[key] for r in results["FSDP2"]) / max(r[key] for r in results["DDP"])
             for key in ("peak_rss_steps", "peak_rss")}
    ddp, fsdp = (max(sum(r[key] for key in columns) for r in results[mode]) for mode in CONFIGS)
    print(f"\nFSDP2 / DDP per process: parameters + gradients + optimizer {fsdp / ddp:.2f}x, peak RSS in the "
          f"training steps {ratio['peak_rss_steps']:.2f}x, over the whole run {ratio['peak_rss']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The main job (`hfgpt pretrain` with no arguments) with hfgpt's speed defaults against fp32 eager, in one run.

Each setting runs the whole command in a fresh process (tokenizer training, data, training, evaluation, samples,
card) into a temporary directory; the table gives its wall time, training time, validation perplexity and training
tokens/s with MFU, read from the run's training_summary.json.

    python bench/main_job.py                       # defaults (bf16 here, and fp32) vs fp32 eager
    python bench/main_job.py --extra --num_train_epochs 3   # the same, with other pretrain arguments for both
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> (pretrain flags, environment). "before": fp32 eager through MKL, as `hfgpt pretrain` trained before the speed
# work (HFGPT_ONEDNN=0: fp32 runs now compute their linear layers through oneDNN where it is faster, hfgpt.onednn)
SETTINGS = {
    "fp32 eager (before)": (["--bf16", "false", "--torch_compile", "false"], {"HFGPT_ONEDNN": "0"}),
    "hfgpt defaults": ([], {}),
    # what a CPU without native bf16 runs by default (and --bf16 false here): fp32, compiled when the run is long
    # enough, linear layers through oneDNN where it is faster
    "hfgpt defaults, fp32": (["--bf16", "false"], {}),
}


def run(flags: list[str], env: dict[str, str], extra: list[str], output_dir: Path) -> dict:
    command = [sys.executable, "-m", "hfgpt.cli", "pretrain", "--output_dir", str(output_dir), "--disable_tqdm", "true",
               *flags, *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, **env})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((output_dir / "training_summary.json").read_text(encoding="utf-8"))
    metrics, speed = summary["final_metrics"], summary["speed"]
    chosen = next((line for line in done.stdout.splitlines() if line.startswith("Speed settings")), "")
    return {"wall_seconds": round(wall, 1), "train_seconds": round(metrics["train_runtime"], 1),
            "eval_perplexity": round(metrics["eval_perplexity"], 1), "steps": metrics["global_step"],
            "tokens_per_second": speed.get("tokens_per_second"), "mfu": speed.get("mfu"),
            "precision": speed["precision"], "torch_compile": speed["torch_compile"], "chosen": chosen}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `hfgpt pretrain` arguments")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="hfgpt-main-job-") as tmp:
        for name, (flags, env) in SETTINGS.items():
            results[name] = run(flags, env, args.extra, Path(tmp) / name.replace(" ", "-"))
            print(name, json.dumps(results[name]), flush=True)
    print(f"\n{'setting':<22} {'wall s':>7} {'train s':>8} {'perplexity':>10} {'tok/s':>8} {'MFU':>6}")
    for name, result in results.items():
        print(f"{name:<22} {result['wall_seconds']:>7.1f} {result['train_seconds']:>8.1f} "
              f"{result['eval_perplexity']:>10.1f} {result['tokens_per_second'] or 0:>8,.0f} {result['mfu'] or 0:>6.1%}")
    before = results["fp32 eager (before)"]
    print()
    for name in ("hfgpt defaults", "hfgpt defaults, fp32"):
        after = results[name]
        print(f"{name}: wall time {after['wall_seconds'] / before['wall_seconds']:.2f}x, training time "
              f"{after['train_seconds'] / before['train_seconds']:.2f}x of fp32 eager's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

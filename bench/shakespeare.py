"""Tiny Shakespeare: validation loss in nats per character after a fixed wall-clock training budget.

    python bench/shakespeare.py --config bpe512-modern-4x128-b128 --time_budget 60   # one configuration
    python bench/shakespeare.py --reference                                          # + the reference run first;
                                                                                     #   its wall time is the budget

Data: ../shared/data/tinyshakespeare.txt, first 90% of the characters for training, last 10% for validation (nanoGPT's
split). Every run goes through hfgpt's own pipeline: `hfgpt.training.pretrain` (tokenizer training with
`hfgpt.tokenization`, `hfgpt.data` loading and packing, the Trainer with decay on matrices), with the training split
read as one document and cut into blocks.

The metric is total validation nats / validation characters (every token of the validation text scored once, by
`hfgpt.evaluation.perplexity`), so character-level and BPE tokenizers compare. The reference is nanoGPT's CPU "baby
GPT" recipe (4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 iterations, lr 1e-3 -> 1e-4 cosine, 100 warmup,
beta2 0.99, dropout 0, character tokens), which reaches 1.88 nats/char in nanoGPT; `--reference` re-runs that recipe
here with hfgpt to measure its wall time on this machine (and checks that hfgpt reproduces its loss). A
configuration's training budget is the measured reference time, or `--time_budget`. The number of steps is chosen from
a short timing run so that the cosine schedule ends inside the budget; a callback stops training if the machine gets
slower than timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
REFERENCE_NATS_PER_CHAR = 1.88  # nanoGPT README, baby GPT on CPU, 2000 iterations
CHAR_VOCAB = 261  # hfgpt's byte-level BPE with no merges: 256 bytes + 5 special tokens = one token per ASCII character

MODERN_BLOCK = "position_embedding_type=rope,norm_type=rmsnorm,hidden_act=swiglu"


def spec(vocab_size: int, block_size: int, batch_size: int, width: int = 128, layers: int = 4, heads: int = 4,
         modern: bool = True, learning_rate: float = 2e-3, extra_overrides: str = "") -> dict:
    """Pretrain arguments for one configuration: a bias-free GPT of the given shape (GPT-2 blocks or the modern ones)."""
    overrides = (f"hidden_size={width},num_hidden_layers={layers},num_attention_heads={heads},"
                 f"max_position_embeddings={block_size},bias=false")
    return dict(vocab_size=vocab_size, block_size=block_size, batch_size=batch_size, learning_rate=learning_rate,
                min_lr=1e-4, warmup_steps=50, adam_beta2=0.99,
                overrides=",".join(part for part in (overrides, MODERN_BLOCK if modern else "", extra_overrides) if part))


# name -> pretrain arguments. "steps" is used only by the reference (fixed 2000 iterations); the others get the budget.
CONFIGS: dict[str, dict] = {
    # nanoGPT's baby GPT: GPT-2 blocks, exact GELU, no biases, learned positions; in fp32 and eager, as nanoGPT runs
    # on a CPU (the others train with hfgpt's defaults for this hardware: bf16 where native, compile where it pays)
    "baby-gpt": dict(spec(CHAR_VOCAB, 64, 12, modern=False, learning_rate=1e-3, extra_overrides="hidden_act=gelu"),
                     warmup_steps=100, steps=2000, speed_flags=["--bf16", "false", "--torch_compile", "false"]),
    "char-4x128-b128": spec(CHAR_VOCAB, 128, 16, modern=False),
    "char-modern-4x128-b128": spec(CHAR_VOCAB, 128, 16),
    "char-modern-4x128-b64": spec(CHAR_VOCAB, 64, 12),
    "char-6x192": spec(CHAR_VOCAB, 128, 16, width=192, layers=6, heads=6, modern=False, learning_rate=1.5e-3),
    "bpe512-4x128-b64": spec(512, 64, 16, modern=False),
    "bpe512-modern-4x128-b64": spec(512, 64, 16),
    "bpe512-modern-4x128-b128": spec(512, 128, 12),
    "bpe512-modern-4x192-b128": spec(512, 128, 12, width=192),
    "bpe512-modern-6x128-b128": spec(512, 128, 12, layers=6),
    "bpe1024-modern-4x128-b128": spec(1024, 128, 12),
    "bpe1024-4x192-b64": spec(1024, 64, 16, width=192, modern=False),
    # a mixture of 4 experts (top-2), each the default's MLP, against the dense model with the same active
    # parameters per token (an MLP twice as wide)
    "bpe512-modern-4x128-b128-moe4top2": spec(512, 128, 12, extra_overrides="num_experts=4,num_experts_per_tok=2"),
    "bpe512-modern-4x128-b128-mlp768": spec(512, 128, 12, extra_overrides="intermediate_size=768"),
}


def split_corpus(path: Path, directory: Path) -> tuple[str, str]:
    """First 90% of the characters -> train.txt, last 10% -> validation.txt."""
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    train, validation = directory / "train.txt", directory / "validation.txt"
    train.write_text(text[:cut], encoding="utf-8")
    validation.write_text(text[cut:], encoding="utf-8")
    return str(train), str(validation)


def pretrain_argv(spec: dict, train: str, output_dir: Path, steps: int, seed: int,
                  tokenizer_dir: Path | None = None) -> list[str]:
    """`tokenizer_dir`: a tokenizer already trained for this configuration (else one is trained)."""
    tokenizer = (["--tokenizer_name_or_path", str(tokenizer_dir)] if tokenizer_dir
                 else ["--vocab_size", str(spec["vocab_size"])])
    return [
        # validation is scored after training, on the raw text (nats_per_character), not by the Trainer
        "--train_file", train, "--validation_split_percentage", "0", "--sample_by", "document",
        *tokenizer, "--preset", "tiny", "--config_overrides", spec["overrides"],
        "--block_size", str(spec["block_size"]), "--per_device_train_batch_size", str(spec["batch_size"]),
        "--per_device_eval_batch_size", "64", "--max_steps", str(steps),
        "--learning_rate", str(spec["learning_rate"]), "--lr_scheduler_type", "cosine_with_min_lr",
        "--lr_scheduler_kwargs", json.dumps({"min_lr": spec["min_lr"]}),
        "--warmup_steps", str(min(spec["warmup_steps"], max(1, steps // 10))),
        "--adam_beta2", str(spec["adam_beta2"]), "--weight_decay", "0.1", "--max_grad_norm", "1.0",
        "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "100",
        "--num_samples", "0", "--output_dir", str(output_dir), "--overwrite_output_dir", "true",
        "--seed", str(seed), "--disable_tqdm", "true", "--dataloader_num_workers", "0",
        *spec.get("speed_flags", []),
    ]


class StepClock(TrainerCallback):
    """Times the training loop; stops it when the budget is spent."""

    def __init__(self, budget: float | None = None):
        self.budget, self.start, self.step_times = budget, None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter())
        if self.budget is not None and self.elapsed >= self.budget:
            control.should_training_stop = True

    @property
    def elapsed(self) -> float:
        return (self.step_times[-1] if self.step_times else time.perf_counter()) - self.start


def nats_per_character(model, tokenizer, text: str, block_size: int) -> tuple[float, int]:
    """Total nats / characters of `text`, every token scored once by hfgpt's perplexity runner (BOS first, windows of
    `block_size` tokens overlapping by one, so each prediction sees at most a block of context, as in training)."""
    from hfgpt.evaluation.perplexity import compute_perplexity

    result = compute_perplexity([text], model, tokenizer, add_start_token=True, max_length=block_size,
                                stride=block_size - 1, batch_size=64, progress=False)
    return result["mean_nll"] * result["num_tokens"] / len(text), result["num_tokens"]


def expert_load(model, tokenizer, text: str, block_size: int, max_blocks: int = 64) -> list[list[float]] | None:
    """For a mixture-of-experts model: per mixture block, the share of the validation tokens' top-k assignments that
    went to each expert (a balanced router gives 1 / num_experts each); None for a dense model."""
    if getattr(model.config, "num_experts", 0) < 2:
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    blocks = [ids[i:i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)][:max_blocks]
    model.eval()
    with torch.no_grad():
        router_logits = model(torch.tensor(blocks, device=model.device), output_router_logits=True).router_logits
    k, experts = model.config.num_experts_per_tok, model.config.num_experts
    counts = [torch.bincount(logits.topk(k, dim=-1).indices.flatten(), minlength=experts) for logits in router_logits]
    return [[round(count / (logits.shape[0] * k), 3) for count in block.tolist()]
            for block, logits in zip(counts, router_logits)]


def run(name: str, data: tuple[str, str], workdir: Path, budget: float | None, seed: int) -> dict:
    """Train configuration `name` (for its fixed steps, or for `budget` seconds) and measure nats/char."""
    from hfgpt.training.pretrain import parse_args, prepare_pretraining

    spec = CONFIGS[name]
    steps = spec.get("steps")
    calibration_seconds, tokenizer_dir = 0.0, None
    if budget is not None:  # time a few steps first, so that the schedule's length fits the budget
        started = time.perf_counter()
        clock = StepClock()
        run_ = prepare_pretraining(*parse_args(pretrain_argv(spec, data[0], workdir / f"{name}-timing", 40, seed)),
                                   callbacks=[clock])
        run_.trainer.train()
        tokenizer_dir = workdir / f"{name}-tokenizer"  # the main run reuses it instead of training it again
        run_.tokenizer.save_pretrained(tokenizer_dir)
        intervals = sorted(b - a for a, b in zip(clock.step_times[10:], clock.step_times[11:]))
        step_seconds = intervals[len(intervals) // 2]  # the median: the first steps and hiccups are slower
        calibration_seconds = time.perf_counter() - started
        steps = max(10, int(budget / step_seconds))
    clock = StepClock(budget)
    run_ = prepare_pretraining(*parse_args(pretrain_argv(spec, data[0], workdir / name, steps, seed, tokenizer_dir)),
                               callbacks=[clock])
    run_.trainer.train()
    train_seconds = clock.elapsed
    model, tokenizer = run_.trainer.model, run_.tokenizer
    validation_text = Path(data[1]).read_text(encoding="utf-8")
    nats, tokens_scored = nats_per_character(model, tokenizer, validation_text, spec["block_size"])
    load = expert_load(model, tokenizer, validation_text, spec["block_size"])
    tokens = len(clock.step_times) * spec["batch_size"] * spec["block_size"]
    return {
        "config": name, "nats_per_char": round(nats, 4), "steps": len(clock.step_times), "planned_steps": steps,
        "train_seconds": round(train_seconds, 1), "calibration_seconds": round(calibration_seconds, 1),
        "tokens_per_second": round(tokens / train_seconds), "validation_chars": len(validation_text),
        "parameters": model.num_parameters(), "vocab_size": len(tokenizer),
        **({"expert_load": load} if load is not None else {}),
        "tokens_per_char": round(tokens_scored / len(validation_text), 3),
        "precision": "bf16" if run_.training_args.bf16 else "fp32",
        "torch_compile": run_.training_args.hfgpt_torch_compile is True,
        **{key: value for key, value in spec.items() if key not in ("steps", "speed_flags")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", default=["bpe512-modern-4x128-b128"], choices=sorted(CONFIGS),
                        help="Configuration(s) to train within the budget.")
    parser.add_argument("--time_budget", type=float, help="Training seconds per configuration (default: the "
                        "reference run's wall time; needs --reference when not given).")
    parser.add_argument("--reference", action="store_true", help="First run nanoGPT's baby GPT recipe (2000 steps) "
                        "to measure its wall time and loss here.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice).")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--results", type=Path, help="Append every result as a JSON line to this file.")
    args = parser.parse_args(argv)
    if args.time_budget is None and not args.reference:
        parser.error("give --time_budget SECONDS, or --reference to use the reference run's wall time")
    if not args.data.is_file():
        parser.error(f"{args.data} not found: the bench reads ../shared/data/tinyshakespeare.txt beside the repo")
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    with tempfile.TemporaryDirectory(prefix="hfgpt-shakespeare-") as tmp:
        workdir = Path(tmp)
        data = split_corpus(args.data, workdir)
        budget = args.time_budget
        if args.reference:
            reference = run("baby-gpt", data, workdir, None, args.seed)
            reference["role"] = "reference (nanoGPT baby GPT recipe, 2000 steps)"
            results.append(reference)
            print(json.dumps(reference), flush=True)
            budget = budget or reference["train_seconds"]
        for name in args.config:
            result = run(name, data, workdir, budget, args.seed)
            result["budget_seconds"] = round(budget, 1)
            results.append(result)
            print(json.dumps(result), flush=True)

    print(f"\nnats/char on the last 10% of Tiny Shakespeare (nanoGPT's baby GPT: {REFERENCE_NATS_PER_CHAR}):")
    for result in results:
        ratio = result["nats_per_char"] / REFERENCE_NATS_PER_CHAR
        print(f"  {result['config']:<24} {result['nats_per_char']:.4f}  ({ratio:.3f} x nanoGPT's)  "
              f"{result['train_seconds']:.0f} s, {result['steps']} steps, {result['tokens_per_second']} tokens/s")
        if "expert_load" in result:
            print(f"  {'':<24} experts' share of the validation tokens, per block: {result['expert_load']}")
    if args.results:
        with args.results.open("a", encoding="utf-8") as handle:
            for result in results:
                handle.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

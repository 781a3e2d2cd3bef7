"""The three training stages end to end on real data: pretraining -> instruction SFT -> DPO, with ROUGE-L at each stage.

This is recipes/chat.yaml run by `hfgpt run` (hfgpt.recipes): the recipe holds every setting; this script only turns
its options into `--set` overrides, runs the recipe in this process and prints the benchmark's table.

Data (read by path, never copied): ../shared/data/instructions.jsonl (1,000 Alpaca rows) and
../shared/data/preferences.jsonl (1,000 preference pairs for the same instructions, row for row). The last 10% of
each file is held out; nothing held out is used for training at any stage.

1. Pretraining: a new byte-level BPE and a small hfgpt model trained from nothing, as a plain language model, on the
   text of the training split only: the 900 instructions with their answers (no chat format, no roles).
2. ROUGE-L of the pretrained model's answers to the 100 held-out instructions (rendered with the chat template,
   greedy decoding) against the reference outputs: "before SFT" (the recipe's eval stage).
3. SFT on the 900 training rows, assistant-only loss: ROUGE-L "after SFT".
4. DPO from the SFT model on the 900 training pairs, reference = a frozen copy of the SFT model, loss DPO's hinge
   form (SLiC's) + the chosen answer's NLL (TRL loss_type ["hinge", "sft"], chosen over the RPO-style
   ["sigmoid", "sft"] on a development split of the training pairs, see bench/alignment_experiments.md;
   `--loss_type sigmoid` for plain DPO): the held-out reward accuracy and margin on the 100 held-out pairs, and
   ROUGE-L "after DPO" on the same 100 held-out instructions (references: instructions.jsonl's outputs, as before).

    python bench/alignment.py                  # the full run (targets: within 20 minutes on 2 CPU cores)
    python bench/alignment.py --quick          # a smoke run of every stage (minutes, numbers meaningless)
    python bench/alignment.py --dev_fold 700   # a development run: rows 701-800 held out, 901-1000 unread

Like any recipe, a second run with the same settings skips the finished stages (and shows their numbers and wall
times); delete the output directory to measure again. Prints one table, the wall time of each stage, and the
machine's load average (other processes slow it down).

(Before it ran the recipe, this script also had `--pretraining_text instructions+preferences`, the pretraining text
with both answers of every training pair; the experiments log's runs with it are at commit ceba318.)
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "chat.yaml"
DATA_DIR = REPO.parent / "shared" / "data"
HOLD_OUT = 0.10
DATA_FILES = {"instructions_train": "instructions.jsonl", "instructions_held_out": "instructions.jsonl",
              "preferences_train": "preferences.jsonl", "preferences_held_out": "preferences.jsonl",
              "pretraining_text": "instructions.jsonl"}


def row_specs(num_rows: int, dev_fold: int | None = None) -> tuple[str, str]:
    """(training rows, held-out rows) as the recipe's `rows:` specs: the last 10% held out; with `dev_fold`, a
    development split instead: the 10% starting at row `dev_fold` is held out and the last 10% is read by no stage."""
    size = int(num_rows * HOLD_OUT)
    cut = num_rows - size
    if dev_fold is None:
        return f":{cut}", f"{cut}:"
    if not 0 <= dev_fold <= cut - size:
        raise ValueError(f"--dev_fold {dev_fold}: a development fold of {size} rows must start between 0 and "
                         f"{cut - size}, inside the first {cut} rows (the last {size} are the held-out rows).")
    return f":{dev_fold},{dev_fold + size}:{cut}", f"{dev_fold}:{dev_fold + size}"


def recipe_overrides(args) -> list[str]:
    """The bench's options as `hfgpt run --set` overrides of recipes/chat.yaml."""
    from hfgpt import files

    overrides = [f"output_dir={args.output_dir}"]
    for name, file in DATA_FILES.items():
        path = Path(args.data_dir) / file
        overrides.append(f"data.{name}.from={path}")
        if args.dev_fold is not None:  # else the recipe's own split: the last 10% of each file held out
            train, held_out = row_specs(len(files.read_rows(path)), args.dev_fold)
            overrides.append(f"data.{name}.rows='{held_out if name.endswith('held_out') else train}'")  # YAML-quoted
    options = {"pretrain.num_train_epochs": args.pretrain_epochs, "pretrain.vocab_size": args.vocab_size,
               "pretrain.config_overrides": args.config_overrides, "sft.num_train_epochs": args.sft_epochs,
               "dpo.num_train_epochs": args.dpo_epochs, "sft.learning_rate": args.sft_learning_rate,
               "dpo.learning_rate": args.dpo_learning_rate, "dpo.beta": args.beta,
               "dpo.loss_type": args.loss_type and f"[{', '.join(args.loss_type)}]"}
    overrides += [f"{key}={value}" for key, value in options.items() if value is not None]
    if args.quick:
        overrides += [f"{stage}.max_steps=3" for stage in ("pretrain", "sft", "dpo")]
        overrides += ["sft.max_eval_prompts=8", "dpo.max_eval_prompts=8", "eval.rouge.max_examples=8"]
    return overrides


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/bench_alignment", help="Where the recipe's stages go.")
    parser.add_argument("--data_dir", default=str(DATA_DIR))
    parser.add_argument("--quick", action="store_true", help="A few steps per stage: checks the plumbing only.")
    parser.add_argument("--dev_fold", type=int, default=None, metavar="START",
                        help="A development run: hold out rows START..START+99 of each file (of the first 900) "
                             "and leave the last 100 out of every stage, so settings can be compared without "
                             "looking at the held-out rows (bench/alignment_experiments.md).")
    # default None everywhere below: the recipe's value (recipes/chat.yaml)
    parser.add_argument("--pretrain_epochs", type=float,
                        help="Over the small training corpus (recipe: 48; on a development fold 48 beat 16 and 96, "
                             "bench/alignment_experiments.md).")
    parser.add_argument("--vocab_size", type=int,
                        help="The BPE vocabulary trained for pretraining (recipe: 2,048). 1,024 led over six "
                             "development folds on a GPU but tied on the CPU and lost on the held-out pairs.")
    parser.add_argument("--config_overrides",
                        help="The model: the `small` preset with these overrides (hfgpt pretrain's flag; recipe: "
                             "hidden_size=256,num_hidden_layers=4,num_attention_heads=4).")
    parser.add_argument("--sft_epochs", type=float)
    parser.add_argument("--dpo_epochs", type=float)
    parser.add_argument("--sft_learning_rate", type=float)
    parser.add_argument("--dpo_learning_rate", type=float)
    parser.add_argument("--beta", type=float)
    parser.add_argument("--loss_type", nargs="+",
                        help="DPO loss(es), summed; 'sft' adds the NLL of the chosen answer ('sigmoid sft': RPO). "
                             "Recipe: hinge sft.")
    parser.add_argument("--threads", type=int, default=1,
                        help="Torch threads. 1 by default: with other processes on the cores, a second thread made "
                             "this small model's steps slower here (each op waits for both threads).")
    args = parser.parse_args(argv)

    from hfgpt.recipes import RecipeError, run_recipe

    torch.set_num_threads(args.threads)
    started = time.time()
    try:
        overrides = recipe_overrides(args)
    except ValueError as error:
        parser.error(str(error))
    try:
        status = run_recipe(RECIPE, overrides)
    except RecipeError as error:
        print(f"bench/alignment.py: error: {error}", file=sys.stderr)
        return 1
    if status != 0:
        return status
    total = time.time() - started
    report(Path(args.output_dir), args, total)
    return 0


def report(output_dir: Path, args, total: float) -> None:
    from hfgpt import files

    summary = files.read_json(output_dir / "summary.json")
    stages = {row["stage"]: row for row in summary["stages"]}
    pretrain = files.read_json(output_dir / "pretrain" / files.TRAINING_SUMMARY)["final_metrics"]
    before = next(result for result in files.read_json(output_dir / "pretrain" / files.EVAL_RESULTS).values()
                  if result.get("dataset", {}).get("name") == "instructions_held_out.jsonl")
    sft = files.read_json(output_dir / "sft" / files.EVAL_RESULTS)
    dpo = files.read_json(output_dir / "dpo" / files.EVAL_RESULTS)
    preference = dpo["preference"]
    config = files.read_json(output_dir / "pretrain" / "config.json")
    print("\n=== hfgpt alignment benchmark" + (" (--quick: plumbing only)" if args.quick else "") + " ===")
    print(f"model: {config['hidden_size']} wide, {config['num_hidden_layers']} layers, vocab {config['vocab_size']}; "
          f"pretrained on the training instructions, loss {pretrain['train_loss']:.3f} after "
          f"{pretrain['global_step']} steps")
    print(f"held-out: {before['num_examples']} instructions, {preference['num_pairs']} preference pairs"
          + (f" (development fold: rows {args.dev_fold + 1}-{args.dev_fold + preference['num_pairs']})"
             if args.dev_fold is not None else ""))
    print(f"{'stage':<14}{'ROUGE-1':>9}{'ROUGE-2':>9}{'ROUGE-L':>9}")
    for name, scores in (("before SFT", before), ("after SFT", sft["rouge"]), ("after DPO", dpo["rouge"])):
        print(f"{name:<14}{scores['rouge1']:>9.3f}{scores['rouge2']:>9.3f}{scores['rougeL']:>9.3f}")
    print(f"DPO loss {' + '.join(preference['loss_type'])}; held-out reward accuracy "
          f"{preference['reward_accuracy']:.3f}, margin {preference['reward_margin']:.3f} "
          f"(beta {preference['beta']}, chosen {preference['reward_chosen']:.3f}, rejected "
          f"{preference['reward_rejected']:.3f})")
    pairs = files.read_rows(output_dir / "dpo" / files.PREFERENCE_PAIRS)
    wrong = [pair for pair in pairs if not pair["prefers_chosen"]]
    print(f"  the policy prefers the rejected answer in {len(wrong)} held-out pairs: "
          f"{output_dir / 'dpo' / files.PREFERENCE_PAIRS} lists every pair with its rewards")
    for stage, label in (("pretrain", "pretraining"), ("sft", "SFT (+ generation)"),
                         ("dpo", "DPO (+ evaluation, generation)"), ("eval", "generation before SFT")):
        row = stages[stage]
        print(f"  {label:<32}{row['wall_time_seconds'] or 0:>7.0f} s" + (" (an earlier run's)"
                                                                         if row["status"] == "skipped" else ""))
    print(f"total wall time {total / 60:.1f} min on {args.threads} threads; load average now "
          f"{', '.join(f'{load:.1f}' for load in os.getloadavg())} (other processes share the cores)")


if __name__ == "__main__":
    raise SystemExit(main())

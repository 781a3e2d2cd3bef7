"""SMS spam: does pretraining a small hfgpt here earn its keep? Full, LoRA and QLoRA fine-tuning against a model
trained from nothing.

    python bench/spam.py                                 # everything: split, pretrain, baseline, full, lora, qlora
    python bench/spam.py --modes full,lora --skip_baseline --pretrained out/bench_spam/pretrained

Steps (each a separate `hfgpt` process, so its wall time and peak memory are its own):
1. Split ../shared/data/sms_spam.tsv with hfgpt.data: the last --heldout_percentage % of the rows are held out (the
   file is a random sample, so its tail is too). Nothing of the held-out rows is seen before the final scoring: not
   by the tokenizer, not by pretraining, not by fine-tuning (no model selection on them either: the last epoch's
   model is scored).
2. Pretrain (`hfgpt pretrain`): a byte-level BPE and a small causal LM on the *text* of the training messages (one
   message per document), the only in-domain text there is here.
3. Fine-tune (`hfgpt classify`) on the labelled training messages: the pretrained model in full, LoRA and QLoRA
   modes, and the same architecture from random weights ("from nothing", full fine-tuning with the same settings).
   Each message starts with <|endoftext|>, as every pretraining document does (hfgpt classify's default), and the
   head reads the last token's state (`--classifier_pooling mean`: the mean of the message's token states).
   `--lm_loss_weight W` (off by default) has every run, the baseline's too, also train as a language model on the
   messages, W times that loss added to the classification loss (GPT-1's auxiliary objective).
   With `--soup K`, each mode trains K runs from the same start with seeds seed .. seed+K-1 (two at a time with
   `--jobs 2`) and `hfgpt average` averages their weights into one model, a model soup; the table shows the soup
   and every run in it. The default, `--soup 1`, is one run per mode (a soup of 3 was no better here:
   bench/spam_experiments.md).
4. Print held-out accuracy, spam precision / recall / F1, wall time and CPU time per step, and save it all as JSON.
   A mode's wall time is that of all its runs and the averaging (what the 15-minute budget is about).
5. With `--label_counts 100,200,...`, a label-efficiency curve: the pretrained model in each of --modes and the
   from-nothing baseline (unless --skip_baseline) fine-tuned on only the first N labelled training messages (the
   file is shuffled, so they are a random sample), and on all of them, each for as many optimizer steps as that
   mode's run on all messages, at `--label_curve_seeds` seeds; pretraining still reads the text of every training
   message (unlabelled text is cheap, labels are not). Prints the table and plots it to label_curve.png.

The machine may be shared: the table gives each step's CPU time / wall time and the load average, so contention is
visible next to the timings.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hfgpt.files import (EVAL_RESULTS, LOG_HISTORY_JSON, ROW_FILE_SUFFIXES, TRAINING_SUMMARY, read_json, read_rows,
                         write_json)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sms_spam.tsv"
MODES = ("full", "lora", "qlora")
STEP_RECORD = "bench_step.json"  # in a finished step's output directory: its command and timings (--resume)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="The labelled messages: any file hfgpt reads "
                        "(.tsv/.csv/.jsonl) with 'label' and 'text' columns.")
    parser.add_argument("--output_dir", default="out/bench_spam")
    parser.add_argument("--heldout_percentage", type=float, default=20.0)
    parser.add_argument("--modes", default=",".join(MODES), help="Comma-separated subset of full, lora, qlora.")
    parser.add_argument("--skip_baseline", action="store_true", help="Do not train the from-nothing baseline.")
    parser.add_argument("--pretrained", help="Use this pretrained model directory instead of pretraining.")
    parser.add_argument("--threads", type=int, default=None,
                        help="Threads per step (OMP_NUM_THREADS). On a machine shared by other jobs, 1 thread is "
                             "often faster than 2 fighting for the same cores.")
    # the model and its pretraining
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--config_overrides", default="num_hidden_layers=4,hidden_size=192,num_attention_heads=4,"
                        "max_position_embeddings=128,embedding_dropout=0.1,residual_dropout=0.1")
    parser.add_argument("--pretrain_epochs", type=float, default=8.0)
    parser.add_argument("--pretrain_learning_rate", type=float, default=2e-3)
    parser.add_argument("--pretrain_batch_size", type=int, default=16)
    parser.add_argument("--pretrain_extra_files", nargs="*", default=[],
                        help="More text to pretrain on beside the training messages (never the held-out ones): row "
                             "files, .jsonl/.json/.csv/.tsv (a row's text fields, joined, are a document), or plain "
                             "text (a paragraph is a document), e.g. ../shared/data/tinyshakespeare.txt "
                             "../shared/data/instructions.jsonl.")
    # fine-tuning
    parser.add_argument("--epochs", type=float, default=4.0, help="Full fine-tuning and the baseline.")
    parser.add_argument("--lora_epochs", type=float, default=10.0,
                        help="LoRA and QLoRA: the adapters learn more slowly than full weights "
                             "(bench/spam_experiments.md).")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=2e-4,
                        help="Full fine-tuning of the pretrained model (2e-4 beat 5e-4 at every seed on a development "
                             "split: bench/spam_experiments.md).")
    parser.add_argument("--baseline_learning_rate", type=float, default=5e-4,
                        help="The from-nothing baseline (random weights need the higher rate).")
    parser.add_argument("--lora_learning_rate", type=float, default=1e-3,
                        help="LoRA and QLoRA. At 2e-3 both fell back to 'all ham' for epochs "
                             "(bench/spam_experiments.md).")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_alpha", type=float, default=32)
    parser.add_argument("--lora_modules_to_save", default="",
                        help="Modules trained in full beside the adapters in the LoRA and QLoRA modes, e.g. "
                             "'wte,wpe' (the classifier head always is).")
    parser.add_argument("--use_dora", action="store_true", help="DoRA adapters in the LoRA and QLoRA modes.")
    parser.add_argument("--use_rslora", action="store_true", help="rsLoRA scaling in the LoRA and QLoRA modes.")
    parser.add_argument("--classifier_pooling", default="last", choices=("last", "mean"),
                        help="What the classification head reads, for every run: the last token's state or the mean "
                             "of the message's token states (bench/spam_experiments.md has runs of both).")
    parser.add_argument("--class_weights", default="balanced",
                        help="Passed to hfgpt classify for every run: 'balanced' weighs the loss by inverse class "
                             "frequency (13%% of the messages are spam); 'none' for the plain loss.")
    parser.add_argument("--lm_loss_weight", type=float, default=0.0,
                        help="hfgpt classify's --lm_loss_weight for every fine-tuning run, the baseline's included: "
                             "the model's language-modelling loss on the messages, times this, added to the "
                             "classification loss (GPT-1's auxiliary objective). 0 (the default): off. 0.5 about "
                             "halved LoRA's and QLoRA's errors on the development split but not on the held-out "
                             "messages (bench/spam_experiments.md).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--soup", type=int, default=1,
                        help="Runs per mode (seeds seed .. seed+K-1) whose weights are averaged into the scored model "
                             "(a model soup); 1: a single run, no averaging.")
    parser.add_argument("--label_counts", default="",
                        help="Comma-separated numbers of labelled training messages (e.g. 100,200,400,800): also "
                             "fine-tune the pretrained model (each of --modes) and the from-nothing baseline on only "
                             "that many, and on all, and plot held-out accuracy / F1 against the count "
                             "(label_curve.png).")
    parser.add_argument("--label_curve_seeds", type=int, default=2, help="Runs per point of the label curve.")
    parser.add_argument("--jobs", type=int, default=2,
                        help="Runs of one mode trained at the same time (each with --threads threads).")
    parser.add_argument("--resume", action="store_true",
                        help="Reuse each finished step (pretraining, every fine-tuning run) whose output directory "
                             f"records the same command ({STEP_RECORD}): rerun an interrupted bench with the same "
                             "flags and --resume to go on where it stopped. It trusts that the data files and the "
                             "code have not changed since.")
    args = parser.parse_args(argv)
    if args.soup < 1 or args.jobs < 1 or args.label_curve_seeds < 1:
        parser.error("--soup, --jobs and --label_curve_seeds must be at least 1.")
    try:
        args.label_counts = sorted({int(count) for count in args.label_counts.split(",") if count.strip()})
    except ValueError:
        parser.error(f"--label_counts: expected comma-separated whole numbers, got {args.label_counts!r}.")
    if any(count < 1 for count in args.label_counts):
        parser.error("--label_counts: every count must be at least 1.")
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if args.label_counts and args.skip_baseline and not args.modes:
        parser.error("--label_counts with --skip_baseline and no --modes: the curve would have nothing to train.")
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}.")
    return args


def split_data(path: str, heldout_percentage: float, data_dir: Path) -> dict:
    """train.jsonl / heldout.jsonl (label, text), read and split by hfgpt.data as every hfgpt command reads files."""
    from hfgpt.data import load_raw_datasets

    raw = load_raw_datasets(path, validation_split_percentage=heldout_percentage, required_columns=("label", "text"))
    splits = {"train": raw["train"], "heldout": raw["validation"]}  # the held-out part is the file's last rows
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        part.to_json(data_dir / f"{name}.jsonl", lines=True)
    return {name: {"rows": len(part), "spam": part["label"].count("spam")} for name, part in splits.items()}


def step_output(path: Path):
    """A JSON file a step must have written (read_json alone would return None for a missing one)."""
    if not path.is_file():
        raise SystemExit(f"{path} is missing: the step before exited 0 without writing it; see its log.")
    return read_json(path)


def run_step(name: str, argv: list[str], log_dir: Path, threads: int | None, record_dir: Path | None = None,
             resume: bool = False) -> dict:
    """Run `python -m hfgpt.cli ...` and time it: wall time, CPU time of that process, load average. Safe to call
    from several threads at once (each step's CPU time is its own process's). With `record_dir` (the step's output
    directory), a finished step leaves its command and timings there (STEP_RECORD), and with `resume` a step whose
    record holds the same command is not run again."""
    record = record_dir / STEP_RECORD if record_dir else None
    if record and record.is_file():
        done = read_json(record)
        if resume and done.get("argv") == argv:
            print(f"\n== {name}: finished in an earlier run, reused (--resume): {record_dir}", flush=True)
            return done["step"]
        record.unlink()  # the directory is about to be rewritten: an interruption must not leave a stale record
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    print(f"\n== {name}: hfgpt {' '.join(argv)}\n   (log: {log})", flush=True)
    load_before = os.getloadavg()[0]
    started = time.time()
    with open(log, "w", encoding="utf-8") as handle:
        process = subprocess.Popen([sys.executable, "-m", "hfgpt.cli", *argv], stdout=handle,
                                   stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - started
    cpu = usage.ru_utime + usage.ru_stime
    if process.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8").splitlines(keepends=True)[-30:])
        raise SystemExit(f"{name} failed (exit {process.returncode}); the end of {log}:\n{tail}")
    step = {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "cpu_per_wall": round(cpu / wall, 2),
            "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2)}
    print(f"   {name} done in {wall / 60:.1f} min (CPU {cpu / 60:.1f} min, {cpu / wall:.2f} cores busy on average; "
          f"load average {step['load_average_before']} -> {step['load_average_after']})", flush=True)
    if record:
        write_json(record, {"argv": argv, "step": step})
    return step


def write_pretraining_corpus(messages_file: Path, extra_files: list[str], path: Path) -> Path:
    """One plain-text corpus, a document per paragraph: the training messages, then each extra file's documents
    (a row file, .jsonl/.json/.csv/.tsv: a row's text fields joined by newlines; anything else: its paragraphs)."""
    documents = [row["text"] for row in read_rows(messages_file)]
    for file in map(Path, extra_files):
        if file.suffix.lower() in ROW_FILE_SUFFIXES:
            documents += ["\n".join(value for value in row.values() if isinstance(value, str) and value.strip())
                          for row in read_rows(file)]
        else:
            documents += file.read_text(encoding="utf-8").split("\n\n")
    # blank lines separate documents, so none may stay inside one
    documents = ["\n".join(line for line in doc.splitlines() if line.strip()) for doc in documents]
    path.write_text("\n\n".join(doc for doc in documents if doc) + "\n", encoding="utf-8")
    return path


def pretrain(args, data_dir: Path, model_dir: Path, log_dir: Path) -> dict:
    if args.pretrain_extra_files:
        corpus = write_pretraining_corpus(data_dir / "train.jsonl", args.pretrain_extra_files,
                                          data_dir / "pretraining_corpus.txt")
        source = ["--train_file", str(corpus)]
    else:
        source = ["--train_file", str(data_dir / "train.jsonl"), "--text_column", "text"]
    return run_step("pretrain", [
        "pretrain", *source,
        "--vocab_size", str(args.vocab_size), "--preset", "small", "--config_overrides", args.config_overrides,
        "--validation_split_percentage", "5", "--num_train_epochs", str(args.pretrain_epochs),
        "--learning_rate", str(args.pretrain_learning_rate), "--per_device_train_batch_size",
        str(args.pretrain_batch_size), "--eval_steps", "0.25", "--save_steps", "0.5", "--logging_steps", "20",
        "--output_dir", str(model_dir), "--overwrite_output_dir", "--num_samples", "3", "--report_to", "none",
        "--seed", str(args.seed), "--disable_tqdm", "true",
    ], log_dir, args.threads, model_dir, args.resume)


def random_init_copy(pretrained: Path, target: Path, seed: int) -> None:
    """The pretrained model's architecture and tokenizer with fresh random weights: the from-nothing baseline."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    import hfgpt

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(pretrained)
    hfgpt.HFGPTForCausalLM(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(pretrained).save_pretrained(target)


def classify(args, name: str, model_dir: Path, data_dir: Path, output_dir: Path, log_dir: Path,
             extra: list[str], epochs: float, seed: int, train_file: Path | None = None) -> dict:
    step = run_step(name, [
        "classify", "--model_name_or_path", str(model_dir),
        "--train_file", str(train_file or data_dir / "train.jsonl"),
        "--validation_file", str(data_dir / "heldout.jsonl"), "--class_names", "ham,spam",
        "--num_train_epochs", str(epochs), "--per_device_train_batch_size", str(args.batch_size),
        "--output_dir", str(output_dir), "--overwrite_output_dir", "--save_strategy", "no", "--report_to", "none",
        "--seed", str(seed), "--disable_tqdm", "true", "--logging_steps", "20",
        "--classifier_pooling", args.classifier_pooling,
        *(["--class_weights", args.class_weights] if args.class_weights != "none" else []), *extra,
    ], log_dir, args.threads, output_dir, args.resume)
    summary = step_output(output_dir / TRAINING_SUMMARY)
    return {
        **step, **scores(output_dir), "seed": seed,
        "trainable_parameters": summary["parameters"]["trainable"], "total_parameters": summary["parameters"]["total"],
        "linear_bytes": summary["memory"]["linear_bytes"], "linear_fp32_bytes": summary["memory"]["linear_fp32_bytes"],
        "peak_rss_bytes": summary["memory"]["peak_rss_bytes"],
        # the final evaluation repeats the last epoch's: one entry per epoch
        "per_epoch": list({entry.get("epoch"): {key: entry[key] for key in ("epoch", "eval_accuracy", "eval_f1")
                                                if key in entry}
                           for entry in step_output(output_dir / LOG_HISTORY_JSON) if "eval_accuracy" in entry}.values()),
    }


def scores(model_dir: Path) -> dict:
    """Held-out accuracy, spam precision / recall / F1 and error counts from a model directory's eval_results.json."""
    results = step_output(model_dir / EVAL_RESULTS)["classification"]
    (true_ham, false_spam), (false_ham, true_spam) = results["confusion_matrix"]
    return {"accuracy": results["accuracy"], "spam_precision": results["precision"], "spam_recall": results["recall"],
            "spam_f1": results["f1"], "errors": false_spam + false_ham, "false_spam": false_spam,
            "missed_spam": false_ham}


def classify_soup(args, name: str, model_dir: Path, data_dir: Path, output_dir: Path, log_dir: Path,
                  extra: list[str], epochs: float) -> tuple[dict, dict]:
    """`args.soup` runs of one mode from `model_dir` (seeds seed, seed+1, ...; `args.jobs` at a time), then their
    weight average scored on the held-out messages. Returns (the soup's row, the runs' rows)."""
    if args.soup == 1:
        return classify(args, name, model_dir, data_dir, output_dir, log_dir, extra, epochs, args.seed), {}
    seeds = [args.seed + index for index in range(args.soup)]
    run_dirs = {seed: output_dir / f"seed{seed}" for seed in seeds}
    started = time.time()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {seed: pool.submit(classify, args, f"{name}-seed{seed}", model_dir, data_dir, run_dirs[seed],
                                     log_dir, extra, epochs, seed)
                   for seed in seeds}
        runs = {seed: future.result() for seed, future in futures.items()}
    soup_dir = output_dir / "soup"
    average = run_step(f"{name}-average", [
        "average", "--model_dirs", *map(str, run_dirs.values()),
        "--output_dir", str(soup_dir), "--overwrite_output_dir"], log_dir, args.threads)
    evaluation = run_step(f"{name}-soup-eval", [
        "eval", "classification", "--model_name_or_path", str(soup_dir), "--file", str(data_dir / "heldout.jsonl"),
        "--text_column", "text", "--label_column", "label", "--average", "binary"], log_dir, args.threads)
    wall = time.time() - started
    cpu = sum(run["cpu_seconds"] for run in runs.values()) + average["cpu_seconds"] + evaluation["cpu_seconds"]
    first = runs[seeds[0]]
    soup = {
        **scores(soup_dir), "seeds": seeds, "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
        "cpu_per_wall": round(cpu / wall, 2),
        **{key: first[key] for key in ("trainable_parameters", "total_parameters", "linear_bytes",
                                       "linear_fp32_bytes")},
        "peak_rss_bytes": max(run["peak_rss_bytes"] for run in runs.values()),
    }
    return soup, {f"seed {seed}": run for seed, run in runs.items()}


def label_curve(args, train_rows: int, starts: dict[str, tuple[str, Path, list[str], float]], data_dir: Path,
                output_dir: Path, log_dir: Path) -> dict:
    """Fine-tune each start (short name -> (display name, model dir, classify flags, epochs on all messages)) on the
    first N training messages for every N of --label_counts and on all of them, at --label_curve_seeds seeds, each
    run as many optimizer steps as those epochs on all messages (no evaluation before the end). Returns the counts,
    the seeds, each subset's spam count and {display name: {N: [row per seed]}}."""
    from hfgpt.files import write_jsonl

    training = read_rows(data_dir / "train.jsonl")
    counts = sorted({count for count in args.label_counts if count < train_rows} | {train_rows})
    subsets = {count: data_dir / f"train_first{count}.jsonl" for count in counts}
    for count, path in subsets.items():
        write_jsonl(path, training[:count])
    seeds = [args.seed + index for index in range(args.label_curve_seeds)]

    def run(start: str, count: int, seed: int) -> dict:
        _, model_dir, flags, epochs = starts[start]
        steps = math.ceil(math.ceil(train_rows / args.batch_size) * epochs)  # those of a run on every message
        name = f"{start}_labels{count}_seed{seed}"
        return classify(args, name, model_dir, data_dir, output_dir / "label_curve" / name, log_dir,
                        [*flags, "--eval_strategy", "no", "--max_steps", str(steps)], epochs, seed,
                        train_file=subsets[count])

    jobs = [(start, count, seed) for count in counts for start in starts for seed in seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = dict(zip(jobs, pool.map(lambda job: run(*job), jobs)))
    return {"counts": counts, "seeds": seeds,
            "spam": {count: sum(row["label"] == "spam" for row in training[:count]) for count in counts},
            "runs": {display: {count: [rows[start, count, seed] for seed in seeds] for count in counts}
                     for start, (display, *_) in starts.items()}}


def mean_of(runs: list[dict], metric: str) -> float:
    return sum(run[metric] for run in runs) / len(runs)


def print_label_curve(curve: dict) -> None:
    names = list(curve["runs"])
    print(f"\nHeld-out accuracy / spam F1 (mean over seeds {', '.join(map(str, curve['seeds']))}) and errors at "
          f"each seed, by the number of labelled training messages fine-tuning saw:")
    header = f"{'labelled':>8} {'spam':>5}" + "".join(f"  {name:>34}" for name in names)
    print(header + "\n" + "-" * len(header))
    for count in curve["counts"]:
        cells = []
        for name in names:
            runs = curve["runs"][name][count]
            cell = (f"{mean_of(runs, 'accuracy'):.2%} / {mean_of(runs, 'spam_f1'):.3f} "
                    f"({' / '.join(str(run['errors']) for run in runs)})")
            cells.append(f"  {cell:>34}")
        print(f"{count:>8} {curve['spam'][count]:>5}" + "".join(cells))


def plot_label_curve(curve: dict, path: Path) -> Path:
    """Held-out accuracy and spam F1 against the number of labelled messages: one line (the mean) per start, a dot
    per run."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    for panel, (metric, label) in zip(axes, (("accuracy", "held-out accuracy (%)"), ("spam_f1", "spam F1"))):
        scale = 100 if metric == "accuracy" else 1
        for name, by_count in curve["runs"].items():
            counts = curve["counts"]
            means = [scale * mean_of(by_count[count], metric) for count in counts]
            (line,) = panel.plot(counts, means, "o-", label=name, linewidth=1.5, markersize=4)
            dots = [(count, scale * run[metric]) for count in counts for run in by_count[count]]
            panel.plot(*zip(*dots), ".", color=line.get_color(), alpha=0.5)
        panel.set_xscale("log")
        panel.set_xticks(curve["counts"], [str(count) for count in curve["counts"]])
        panel.minorticks_off()
        panel.set_xlabel("labelled training messages")
        panel.set_ylabel(label)
        panel.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle("SMS spam: fine-tuning with fewer labels (held-out messages)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def print_table(results: dict, split: dict) -> None:
    heldout = split["heldout"]
    print(f"\nHeld-out messages: {heldout['rows']} ({heldout['spam']} spam); training messages: "
          f"{split['train']['rows']} ({split['train']['spam']} spam).")
    header = (f"{'run':<22} {'accuracy':>8} {'spam P':>7} {'spam R':>7} {'spam F1':>7} {'errors':>6} "
              f"{'trained params':>15} {'linear MiB':>10} {'peak RSS':>9} {'wall':>7} {'CPU/wall':>8}")
    print(header + "\n" + "-" * len(header))
    rows = []
    for name, row in results["runs"].items():
        rows.append((name, row))
        rows += [(f"  {member}", member_row) for member, member_row in results["soup_members"].get(name, {}).items()]
    for name, row in rows:
        print(f"{name:<22} {row['accuracy']:>8.2%} {row['spam_precision']:>7.3f} {row['spam_recall']:>7.3f} "
              f"{row['spam_f1']:>7.3f} {row['errors']:>6} {row['trainable_parameters']:>15,} "
              f"{row['linear_bytes'] / 2**20:>10.2f} {row['peak_rss_bytes'] / 2**20:>7.0f}Mi "
              f"{row['wall_seconds'] / 60:>5.1f}m {row['cpu_per_wall']:>8.2f}")
    if "pretrain" in results:
        row = results["pretrain"]
        print(f"{'pretraining':<22} {'':>8} {'':>7} {'':>7} {'':>7} {'':>6} {'':>15} {'':>10} {'':>9} "
              f"{row['wall_seconds'] / 60:>5.1f}m {row['cpu_per_wall']:>8.2f}")
    if results["soup_members"]:
        print("\nEach mode's first row is the weight average (model soup) of the runs indented below it; its wall and "
              "CPU time cover all of them and the averaging.")
    print("\nwall: wall-clock time of the whole step (loading, tokenizing, training, evaluating, saving); CPU/wall: "
          "cores busy on average (2 = both cores to itself).")


def main(argv=None) -> int:
    args = parse_args(argv)
    output_dir = Path(args.output_dir).resolve()
    data_dir, log_dir = output_dir / "data", output_dir / "logs"
    split = split_data(args.data, args.heldout_percentage, data_dir)
    results: dict = {"split": split, "settings": vars(args), "cpu_count": os.cpu_count()}

    pretrained = Path(args.pretrained).resolve() if args.pretrained else output_dir / "pretrained"
    if not args.pretrained:
        results["pretrain"] = pretrain(args, data_dir, pretrained, log_dir)
        summary = step_output(pretrained / TRAINING_SUMMARY)
        results["pretrain"]["eval_loss"] = summary["final_metrics"].get("eval_loss")

    runs, members = {}, {}
    baseline_dir = output_dir / "from_nothing_init"
    auxiliary = ["--lm_loss_weight", str(args.lm_loss_weight)] if args.lm_loss_weight else []
    baseline_flags = ["--learning_rate", str(args.baseline_learning_rate), *auxiliary]
    if not args.skip_baseline:
        random_init_copy(pretrained, baseline_dir, args.seed)
        name = "from nothing (full)"
        runs[name], members[name] = classify_soup(args, "from_nothing", baseline_dir, data_dir,
                                                  output_dir / "from_nothing", log_dir, baseline_flags, args.epochs)
    lora = ["--lora_r", str(args.lora_r), "--lora_alpha", str(args.lora_alpha),
            *(["--use_dora"] if args.use_dora else []), *(["--use_rslora"] if args.use_rslora else []),
            *(["--lora_modules_to_save", args.lora_modules_to_save] if args.lora_modules_to_save else [])]
    extra = {mode: [*flags, *auxiliary] for mode, flags in (
        ("full", ["--learning_rate", str(args.learning_rate)]),
        ("lora", ["--lora", *lora, "--learning_rate", str(args.lora_learning_rate)]),
        ("qlora", ["--qlora", *lora, "--learning_rate", str(args.lora_learning_rate)]))}
    epochs = {"full": args.epochs, "lora": args.lora_epochs, "qlora": args.lora_epochs}
    for mode in args.modes:
        name = f"pretrained + {mode}"
        runs[name], members[name] = classify_soup(args, mode, pretrained, data_dir, output_dir / mode, log_dir,
                                                  extra[mode], epochs[mode])
    results["soup_members"] = {name: rows for name, rows in members.items() if rows}
    results["runs"] = runs
    if args.label_counts:
        starts = {} if args.skip_baseline else {
            "from_nothing": ("from nothing (full)", baseline_dir, baseline_flags, args.epochs)}
        starts.update({mode: (f"pretrained + {mode}", pretrained, extra[mode], epochs[mode]) for mode in args.modes})
        results["label_curve"] = label_curve(args, split["train"]["rows"], starts, data_dir, output_dir, log_dir)
    print_table(results, split)
    if args.label_counts:
        print_label_curve(results["label_curve"])
        print(f"\nPlot: {plot_label_curve(results['label_curve'], output_dir / 'label_curve.png')}")
    path = output_dir / "results.json"
    write_json(path, results)
    print(f"\nSaved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

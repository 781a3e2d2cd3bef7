"""The three training stages end to end on real data: pretraining -> instruction SFT -> DPO, with ROUGE-L at each stage.

Data (read by path, never copied): ../shared/data/instructions.jsonl (1,000 Alpaca rows) and
../shared/data/preferences.jsonl (1,000 preference pairs for the same instructions, row for row). The last 10% of
each file is held out; nothing held out is used for training at any stage.

1. Pretraining (hfgpt.training.pretrain): a new byte-level BPE and a small hfgpt model trained from nothing, as a
   plain language model, on the text of the training split only: the 900 instructions with their answers (no chat
   format, no roles). `--pretraining_text instructions+preferences` adds the 900 training preference pairs'
   instructions with each of their two answers, the earlier default: over three development folds DPO from it
   scored a lower mean reward accuracy and varied more from fold to fold (bench/alignment_experiments.md).
2. ROUGE-L of the pretrained model's answers to the 100 held-out instructions (rendered with the chat template,
   greedy decoding) against the reference outputs: "before SFT".
3. SFT (hfgpt.training.alignment.run_sft) on the 900 training rows, assistant-only loss: ROUGE-L "after SFT".
4. DPO (run_dpo) from the SFT model on the 900 training pairs, reference = a frozen copy of the SFT model, loss
   DPO's hinge form (SLiC's) + the chosen answer's NLL (TRL loss_type ["hinge", "sft"], chosen over the RPO-style
   ["sigmoid", "sft"] on a development split of the training pairs, see bench/alignment_experiments.md;
   `--loss_type sigmoid` for plain DPO): the held-out reward accuracy and margin on the 100 held-out pairs, and
   ROUGE-L "after DPO" on the same 100 held-out instructions (references: instructions.jsonl's outputs, as before).

    python bench/alignment.py                  # the full run (targets: within 20 minutes on 2 CPU cores)
    python bench/alignment.py --quick          # a smoke run of every stage (minutes, numbers meaningless)
    python bench/alignment.py --dev_fold 700   # a development run: rows 701-800 held out, 901-1000 unread

Prints one table, the wall time of each stage, and the machine's load average (other processes slow it down).
"""

import argparse
import os
import time
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
HOLD_OUT = 0.10
PRETRAINING_TEXTS = ("instructions", "instructions+preferences")


def split(rows: list[dict], dev_fold: int | None = None) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): the last 10% held out; with `dev_fold`, a development split instead: the
    10% starting at row `dev_fold` is held out and the last 10% is left out of everything."""
    cut = len(rows) - int(len(rows) * HOLD_OUT)
    if dev_fold is None:
        return rows[:cut], rows[cut:]
    size = len(rows) - cut
    if not 0 <= dev_fold <= cut - size:
        raise ValueError(f"--dev_fold {dev_fold}: a development fold of {size} rows must start between 0 and "
                         f"{cut - size}, inside the first {cut} rows (the last {size} are the held-out rows).")
    return rows[:dev_fold] + rows[dev_fold + size:cut], rows[dev_fold:dev_fold + size]


def write_pretraining_corpus(instructions: list[dict], preferences: list[dict], path: Path) -> Path:
    """Plain text, one paragraph per document: each training instruction (with its input) and its answer, then each
    of `preferences`' instructions with its chosen and with its rejected answer. No roles, no chat format."""
    documents = []
    for row in instructions:
        documents.append("\n".join(part for part in (row["instruction"], row.get("input"), row["output"]) if part))
    for row in preferences:
        for answer in (row["chosen"], row["rejected"]):
            documents.append("\n".join(part for part in (row["instruction"], row.get("input"), answer) if part))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path


def pretrain(corpus: Path, output_dir: Path, settings: dict) -> dict:
    from hfgpt.training.pretrain import PretrainArguments, PretrainingArguments, run_pretraining

    args = PretrainArguments(
        train_file=[str(corpus)], vocab_size=settings["vocab_size"], preset="small",
        config_overrides=settings["model"], validation_split_percentage=5, overwrite_output_dir=True, num_samples=0,
    )
    training_args = PretrainingArguments(
        output_dir=str(output_dir), num_train_epochs=settings["pretrain_epochs"], max_steps=settings["max_steps"],
        per_device_train_batch_size=16, learning_rate=2e-3, report_to="none", save_strategy="no",
        eval_strategy="no", logging_steps=20, seed=0, disable_tqdm=settings["quiet"],
    )
    return run_pretraining(args, training_args)


def rouge_before(model_dir: Path, held_out: list[dict], generation) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfgpt.training.alignment import generate_and_score, held_out_prompts

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts, references = held_out_prompts(held_out, "held-out instructions")
    _, scores = generate_and_score(model, tokenizer, prompts, references, generation.max_new_tokens,
                                   generation.batch_size, "held-out instructions")
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/bench_alignment", help="Where the three models go.")
    parser.add_argument("--data_dir", default=str(DATA_DIR))
    parser.add_argument("--quick", action="store_true", help="A few steps per stage: checks the plumbing only.")
    parser.add_argument("--dev_fold", type=int, default=None, metavar="START",
                        help="A development run: hold out rows START..START+99 of each file (of the first 900) "
                             "and leave the last 100 out of every stage, so settings can be compared without "
                             "looking at the held-out rows (bench/alignment_experiments.md).")
    parser.add_argument("--pretrain_epochs", type=float, default=48.0,
                        help="Over the small training corpus; on a development fold 48 beat 16 and 96 "
                             "(bench/alignment_experiments.md). With --pretraining_text instructions+preferences "
                             "(three times the text) the earlier default was 16.")
    parser.add_argument("--pretraining_text", default="instructions", choices=PRETRAINING_TEXTS,
                        help="What pretraining reads: the training instructions with their answers, or those plus "
                             "both answers of every training preference pair (over three development folds DPO did "
                             "worse from that on one, the same on one, better on one: bench/alignment_experiments.md).")
    parser.add_argument("--vocab_size", type=int, default=2048,
                        help="The BPE vocabulary trained for pretraining. 1,024 led over six development folds on a "
                             "GPU but tied on the CPU and lost on the held-out pairs (bench/alignment_experiments.md).")
    parser.add_argument("--config_overrides", default="hidden_size=256,num_hidden_layers=4,num_attention_heads=4",
                        help="The model: the `small` preset with these overrides (hfgpt pretrain's flag).")
    parser.add_argument("--sft_epochs", type=float, default=3.0)
    parser.add_argument("--dpo_epochs", type=float, default=2.0)
    parser.add_argument("--sft_learning_rate", type=float, default=1e-3)
    parser.add_argument("--dpo_learning_rate", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss_type", nargs="+", default=["hinge", "sft"],
                        help="DPO loss(es), summed; 'sft' adds the NLL of the chosen answer ('sigmoid sft': RPO).")
    parser.add_argument("--threads", type=int, default=1,
                        help="Torch threads. 1 by default: with other processes on the cores, a second thread made "
                             "this small model's steps slower here (each op waits for both threads).")
    args = parser.parse_args(argv)

    from hfgpt.files import read_rows
    from hfgpt.training.alignment import GenerationSettings, HFGPTDPOConfig, HFGPTSFTConfig, run_dpo, run_sft

    torch.set_num_threads(args.threads)
    started = time.time()
    data_dir, output_dir = Path(args.data_dir), Path(args.output_dir)
    instructions_train, instructions_held = split(read_rows(data_dir / "instructions.jsonl"), args.dev_fold)
    preferences_train, preferences_held = split(read_rows(data_dir / "preferences.jsonl"), args.dev_fold)
    if args.quick:
        instructions_held, preferences_held = instructions_held[:8], preferences_held[:8]
    steps = {"max_steps": 3} if args.quick else {}
    settings = {"vocab_size": args.vocab_size, "model": args.config_overrides,
                "pretrain_epochs": args.pretrain_epochs, "max_steps": 3 if args.quick else -1, "quiet": False}
    generation = GenerationSettings(max_new_tokens=64, batch_size=20)
    timings = {}

    stage = time.time()
    pretrained = output_dir / "pretrained"
    corpus_pairs = preferences_train if args.pretraining_text == "instructions+preferences" else []
    corpus = write_pretraining_corpus(instructions_train, corpus_pairs, output_dir / "pretraining_corpus.txt")
    pretrain_metrics = pretrain(corpus, pretrained, settings)
    timings["pretraining"] = time.time() - stage

    stage = time.time()
    before = rouge_before(pretrained, instructions_held, generation)
    timings["generation before SFT"] = time.time() - stage

    common = dict(per_device_train_batch_size=16, per_device_eval_batch_size=20, gradient_checkpointing=False,
                  report_to="none", save_strategy="no", logging_steps=10, seed=0, lr_scheduler_type="cosine",
                  warmup_steps=0.05, **steps)
    stage = time.time()
    sft = run_sft(str(pretrained), instructions_train,
                  HFGPTSFTConfig(str(output_dir / "sft"), num_train_epochs=args.sft_epochs,
                                 learning_rate=args.sft_learning_rate, **common),
                  eval_dataset=instructions_held, generation=generation, overwrite_output_dir=True,
                  data_source={"train": "instructions.jsonl (first 90%)",
                               "validation": "instructions.jsonl (last 10%)"})
    timings["SFT (+ generation)"] = time.time() - stage

    stage = time.time()
    dpo = run_dpo(str(output_dir / "sft"), preferences_train,
                  HFGPTDPOConfig(str(output_dir / "dpo"), num_train_epochs=args.dpo_epochs,
                                 learning_rate=args.dpo_learning_rate, beta=args.beta,
                                 loss_type=args.loss_type, **common),
                  eval_dataset=preferences_held, eval_prompts=instructions_held, generation=generation,
                  overwrite_output_dir=True,
                  data_source={"train": "preferences.jsonl (first 90%)", "validation": "preferences.jsonl (last 10%)",
                               "eval_prompts": "instructions.jsonl (last 10%)"})
    timings["DPO (+ evaluation, generation)"] = time.time() - stage
    total = time.time() - started

    preference = dpo.metrics["preference"]
    print("\n=== hfgpt alignment benchmark" + (" (--quick: plumbing only)" if args.quick else "") + " ===")
    print(f"model: {settings['model']}, vocab {settings['vocab_size']}; pretrained on {args.pretraining_text}, loss "
          f"{pretrain_metrics['train_loss']:.3f} after {pretrain_metrics['global_step']} steps")
    print(f"held-out: {len(instructions_held)} instructions, {preference['num_pairs']} preference pairs"
          + (f" (development fold: rows {args.dev_fold + 1}-{args.dev_fold + len(preferences_held)})"
             if args.dev_fold is not None else ""))
    print(f"{'stage':<14}{'ROUGE-1':>9}{'ROUGE-2':>9}{'ROUGE-L':>9}")
    for name, scores in (("before SFT", before), ("after SFT", sft.metrics["rouge"]),
                         ("after DPO", dpo.metrics["rouge"])):
        print(f"{name:<14}{scores['rouge1']:>9.3f}{scores['rouge2']:>9.3f}{scores['rougeL']:>9.3f}")
    print(f"DPO loss {' + '.join(preference['loss_type'])}; held-out reward accuracy "
          f"{preference['reward_accuracy']:.3f}, margin {preference['reward_margin']:.3f} "
          f"(beta {preference['beta']}, chosen {preference['reward_chosen']:.3f}, rejected "
          f"{preference['reward_rejected']:.3f})")
    wrong = [pair for pair in dpo.pairs if not pair["prefers_chosen"]]
    print(f"  the policy prefers the rejected answer in {len(wrong)} held-out pairs: "
          f"{output_dir / 'dpo' / 'preference_pairs.jsonl'} lists every pair with its rewards")
    for name, seconds in timings.items():
        print(f"  {name:<32}{seconds:>7.0f} s")
    print(f"total wall time {total / 60:.1f} min on {args.threads} threads; load average now "
          f"{', '.join(f'{load:.1f}' for load in os.getloadavg())} (other processes share the cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What int8 weights (hfgpt.quantization, `--quantize int8`) cost a trained model, and what they buy, in one process.

    python bench/quantization.py --model_dir runs/chat/sft \
        --prompts_file runs/chat/data/instructions_held_out.jsonl --text_file runs/chat/data/instructions_held_out.jsonl

(`hfgpt run recipes/chat.yaml` makes that model and its held-out split.) The same model is loaded twice, as saved
(fp32) and with int8 weights, and both:

    perplexity  on --text_file (every token scored once, `hfgpt eval perplexity`'s metric), if given
    answers     greedy answers to the first --max_examples prompts of --prompts_file (`hfgpt eval rouge`'s
                generation: chat template, batches with left padding): wall seconds, ROUGE-L against the references,
                and how many int8 answers are identical to the fp32 ones (ROUGE-L between the two for the rest)

A benchmark, not a test: nothing is asserted. Check `uptime` first; the two models alternate, fp32 first.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import evaluate
import torch

from hfgpt.evaluation import metric_path
from hfgpt.evaluation.cli import generate_responses, prompt_and_reference, read_texts
from hfgpt.evaluation.loading import load_model, load_tokenizer
from hfgpt.files import read_rows
from model_speed import print_table  # bench/, beside this script


def timed_answers(model, tokenizer, prompts, max_new_tokens: int, batch_size: int, repeats: int):
    """The answers, and the median wall seconds of `repeats` passes over all prompts."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        answers, _ = generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size, progress=False)
        seconds.append(time.perf_counter() - start)
    return answers, statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="a trained causal LM directory with its tokenizer")
    parser.add_argument("--prompts_file", required=True, help=".jsonl prompts with references (as `hfgpt eval rouge`)")
    parser.add_argument("--text_file", help="held-out text for perplexity (.txt, or .jsonl with --text_column)")
    parser.add_argument("--text_column", default="output")
    parser.add_argument("--max_examples", type=int, default=100)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the prompts per model")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.model_dir)
    models = {"fp32": load_model(args.model_dir, device="cpu"),
              "int8": load_model(args.model_dir, device="cpu", quantize="int8")}
    print(f"model {args.model_dir}: {sum(p.numel() for p in models['fp32'].parameters()) / 1e6:.2f}M parameters; "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")

    rows = []
    if args.text_file:
        texts = [text for text in read_texts(args.text_file, args.text_column) if text.strip()]
        metric = evaluate.load(metric_path("perplexity"))
        perplexity = {name: metric.compute(predictions=texts, model=model, tokenizer=tokenizer, progress=False)
                      for name, model in models.items()}
        change = perplexity["int8"]["perplexity"] / perplexity["fp32"]["perplexity"] - 1
        rows.append(("perplexity", f"{perplexity['fp32']['perplexity']:.3f}", f"{perplexity['int8']['perplexity']:.3f}",
                     f"{change:+.2%} ({perplexity['fp32']['num_tokens']:,} tokens of {Path(args.text_file).name})"))

    pairs = [prompt_and_reference(row, index, args.prompts_file)
             for index, row in enumerate(read_rows(args.prompts_file)[: args.max_examples])]
    prompts, references = [prompt for prompt, _ in pairs], [reference for _, reference in pairs]
    answers, seconds = {}, {}
    for name, model in models.items():
        generate_responses(model, tokenizer, prompts[: args.batch_size], 4, args.batch_size, progress=False)  # warm
        answers[name], seconds[name] = timed_answers(model, tokenizer, prompts, args.max_new_tokens, args.batch_size,
                                                     args.repeats)
    rouge = evaluate.load(metric_path("rouge"), seed=0)
    score = {name: rouge.compute(predictions=answers[name], references=references)["rougeL"] for name in models}
    identical = sum(a == b for a, b in zip(answers["fp32"], answers["int8"]))
    between = rouge.compute(predictions=answers["int8"], references=answers["fp32"])["rougeL"]
    rows.append(("answer seconds", f"{seconds['fp32']:.2f}", f"{seconds['int8']:.2f}",
                 f"{seconds['fp32'] / seconds['int8']:.2f}x faster ({len(prompts)} prompts, up to "
                 f"{args.max_new_tokens} new tokens, batch {args.batch_size}, median of {args.repeats})"))
    rows.append(("ROUGE-L vs references", f"{score['fp32']:.4f}", f"{score['int8']:.4f}",
                 f"{score['int8'] - score['fp32']:+.4f}"))
    rows.append(("answers identical to fp32's", "", f"{identical}/{len(prompts)}",
                 f"ROUGE-L int8 vs fp32 answers {between:.4f}"))

    print_table(("measure", "fp32", "int8", "int8 against fp32"), rows, left=4)
    return 0


if __name__ == "__main__":
    sys.exit(main())

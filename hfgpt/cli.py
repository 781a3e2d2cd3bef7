"""The `hfgpt` command. Each subcommand is a `main(argv)` function living next to the code it drives."""

import importlib
import sys
from pathlib import Path

# name -> (module, function, one-line help). Modules are imported only when their subcommand runs.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "pretrain": ("hfgpt.training.pretrain", "main", "pretrain a causal LM from text (files, a Hub dataset, or the built-in corpus)"),
    "sft": ("hfgpt.training.alignment", "sft_main", "instruction-tune a causal LM with TRL's SFTTrainer (assistant-only loss; --lora/--qlora)"),
    "dpo": ("hfgpt.training.alignment", "dpo_main", "align a causal LM to preference pairs with TRL's DPOTrainer (--beta, --loss_type; --lora/--qlora)"),
    "classify": ("hfgpt.training.classification", "main", "fine-tune a sequence classifier (full, last N blocks, --lora or --qlora)"),
    "average": ("hfgpt.training.averaging", "main", "average the weights of models fine-tuned from one start (a model soup)"),
    "eval": ("hfgpt.evaluation.cli", "main", "evaluate a model: perplexity | rouge | classification; results go to eval_results.json"),
    "card": ("hfgpt.cards", "main", "write the model card (README.md) of a model directory"),
    "push": ("hfgpt.hub", "main", "upload a model directory (weights, code, tokenizer, card) to the Hugging Face Hub"),
    "convert": ("hfgpt.convert.cli", "main", "convert a checkpoint: --from gpt2 (GPT2LMHeadModel -> hfgpt) | --from hfgpt (-> GPT-2)"),
    "export": ("hfgpt.convert.export", "main", "export a model: --to llama (LlamaForCausalLM) | gpt2 (GPT2LMHeadModel) | gguf (llama.cpp)"),
    "plan": ("hfgpt.plan", "main", "plan a compute-optimal pretraining run (Chinchilla): model size, tokens, wall time, command"),
    "run": ("hfgpt.recipes", "main", "run a recipe (YAML): tokenizer, pretrain, sft, dpo, classify, eval, card, push; resumable"),
    "chat": ("hfgpt.chat", "main", "chat with a model in the terminal (streaming, multi-turn), or answer one --prompt"),
}

# The guides (a page per stage) live in the repository's docs/, beside the package in an editable install.
DOCS = Path(__file__).resolve().parents[1] / "docs" / "index.md"

def _version() -> str:
    import torch
    import transformers

    from . import __version__

    return f"hfgpt {__version__} (torch {torch.__version__}, transformers {transformers.__version__})"


def _usage() -> str:
    width = max(map(len, COMMANDS), default=0)
    lines = ["usage: hfgpt <command> [arguments]   (hfgpt <command> --help for its arguments; hfgpt --version)", "",
             "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    where = DOCS if DOCS.is_file() else "docs/index.md in the hfgpt repository"
    lines += ["", f"documentation: {where} (a guide per stage; `mkdocs serve` in the repository builds the site)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(_version())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hfgpt: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[name]
    function = getattr(importlib.import_module(module_name), function_name)
    return function(rest) or 0


if __name__ == "__main__":
    sys.exit(main())

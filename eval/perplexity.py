"""Thin script: `python eval/perplexity.py --help` (the same as `hfgpt eval perplexity`)."""

import sys

from hfgpt.evaluation.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["perplexity", *sys.argv[1:]]))

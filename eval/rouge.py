"""Thin script: `python eval/rouge.py --help` (the same as `hfgpt eval rouge`)."""

import sys

from hfgpt.evaluation.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["rouge", *sys.argv[1:]]))

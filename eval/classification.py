"""Thin script: `python eval/classification.py --help` (the same as `hfgpt eval classification`)."""

import sys

from hfgpt.evaluation.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["classification", *sys.argv[1:]]))

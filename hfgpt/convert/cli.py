"""`hfgpt convert --from gpt2|hfgpt SOURCE OUTPUT`: convert a checkpoint directory (or Hub id) into a new directory."""

import argparse
import sys

from ..docs_smoke import scale_down
from . import CONVERTERS

TARGETS = {"gpt2": "hfgpt", "hfgpt": "gpt2"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hfgpt convert",
        description="Convert between a transformers GPT-2 checkpoint (GPT2LMHeadModel) and hfgpt, exactly "
                    "(same logits). Weights are read from safetensors only.",
    )
    parser.add_argument("--from", dest="source_format", required=True, choices=sorted(CONVERTERS),
                        help="format of SOURCE: gpt2 (converted to hfgpt) or hfgpt (converted to GPT-2)")
    parser.add_argument("source", metavar="SOURCE", help="a local checkpoint directory or a Hub id")
    parser.add_argument("output", metavar="OUTPUT", help="a new (or empty) directory to write the converted model to")
    args = scale_down("hfgpt convert", parser.parse_args(argv))
    try:
        output = CONVERTERS[args.source_format](args.source, args.output)
    except (ValueError, OSError) as error:  # bad input: say what was wrong without a traceback
        print(f"hfgpt convert: error: {error}", file=sys.stderr)
        return 1
    print(f"Converted {args.source_format} {args.source} -> {TARGETS[args.source_format]} {output}")
    return 0

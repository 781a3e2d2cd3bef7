"""`hfgpt export --to llama|gpt2|gguf SOURCE OUTPUT`: take a trained hfgpt model to where other tools run it.

    llama  a transformers LlamaForCausalLM directory (vLLM, MLX, TGI, llama.cpp's convert_hf_to_gguf.py read it)
    gpt2   a transformers GPT2LMHeadModel directory (the same converter as `hfgpt convert --from hfgpt`)
    gguf   one GGUF file for llama.cpp, tokenizer and chat template inside (--dtype f32 | f16 | q8_0)

Every target computes the same function as the source (checked by logits in the tests) or is refused with the switch
it cannot hold. The output is written beside its final name and renamed at the end, so a failed export leaves nothing.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..docs_smoke import scale_down
from .gguf import DTYPES, hfgpt_to_gguf
from .gpt2 import hfgpt_to_gpt2
from .llama import hfgpt_to_llama

# --to value -> converter(source, output, **options)
EXPORTERS = {"llama": hfgpt_to_llama, "gpt2": hfgpt_to_gpt2, "gguf": hfgpt_to_gguf}
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's adapter file: a directory with it and no config.json is adapter-only


def check_source(source: str) -> None:
    """Refuse, in one line each, the directories that hold no complete causal LM. A non-directory is left to the
    converter (it may be a Hub id)."""
    path = Path(source)
    if not path.is_dir():
        if path.exists():
            raise ValueError(f"{source} is a file, not a model directory.")
        return
    if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        raise ValueError(
            f"{source} holds only a LoRA adapter; merge it into its base model first (peft: "
            "model.merge_and_unload().save_pretrained(DIR)) or export the merged directory that "
            "`hfgpt sft/dpo/classify --lora` writes (the output directory itself; the adapter is its adapter/ "
            "subdirectory)."
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"{source} has no config.json: it is not a model directory.")
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    heads = [name for name in architectures if not name.endswith("ForCausalLM")]
    if heads:
        raise ValueError(
            f"{source} holds a {heads[0]}, not a causal language model; only language models export "
            "(point at the model the classifier was fine-tuned from, or at a causal LM directory)."
        )


def export(source: str | os.PathLike, output: str | os.PathLike, to: str, overwrite: bool = False,
           **options) -> Path:
    """Export `source` to `output` in format `to`. An existing `output` is refused unless `overwrite`; it is then
    replaced only once the new export is complete."""
    if to not in EXPORTERS:
        raise ValueError(f"--to {to!r} is not a target; choose one of {', '.join(EXPORTERS)}.")
    source, output = str(source), Path(output)
    check_source(source)
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{output} already exists; choose another path or pass --overwrite to replace it.")
        if output.resolve() == Path(source).resolve():
            raise ValueError(f"{output} is the source itself; export to another path.")
    if not output.exists():
        return EXPORTERS[to](source, output, **options)
    # overwrite: export to a fresh sibling, then swap it in, so a failure keeps the old output untouched
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.export-", dir=output.parent))
    try:
        done = EXPORTERS[to](source, scratch / output.name, **options)
        os.replace(output, scratch / "old")  # a file or a directory; removed with the scratch directory
        os.replace(done, output)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hfgpt export",
        description="Export an hfgpt model directory to another format that computes the same function: "
                    "llama (a transformers LlamaForCausalLM directory), gpt2 (a GPT2LMHeadModel directory) or gguf "
                    "(one file for llama.cpp with the tokenizer and chat template inside).",
    )
    parser.add_argument("--to", required=True, choices=list(EXPORTERS),
                        help="llama: RoPE + RMSNorm + SwiGLU models (the 'modern' presets); gpt2: GPT-2 shaped models "
                             "(learned positions, LayerNorm, GELU); gguf: either of those, as llama.cpp's llama or "
                             "gpt2")
    parser.add_argument("source", metavar="SOURCE", help="the hfgpt model directory (a causal LM, not an adapter)")
    parser.add_argument("output", metavar="OUTPUT", help="the directory (llama, gpt2) or .gguf file (gguf) to write")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="gguf only: the type of the weight matrices (norms and biases stay f32). f32 is exact, "
                             "f16 halves the file, q8_0 quarters it (default: f16)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    options = {}
    if args.dtype is not None:
        if args.to != "gguf":
            parser.error(f"--dtype applies to --to gguf only (a {args.to} directory keeps the source's weights)")
        options["dtype"] = args.dtype
    scale_down("hfgpt export", args)
    try:
        output = export(args.source, args.output, args.to, overwrite=args.overwrite, **options)
    except (ValueError, OSError) as error:  # bad input: one line saying what to do, no traceback
        print(f"hfgpt export: error: {error}", file=sys.stderr)
        return 1
    print(f"Exported {args.source} -> {args.to} {output}")
    return 0

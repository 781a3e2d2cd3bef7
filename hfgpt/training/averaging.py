"""Weight averaging across runs: a *model soup* (Wortsman et al., 2022, "Model soups: averaging weights of multiple
fine-tuned models improves accuracy without increasing inference time").

Models fine-tuned from the same starting weights (with other seeds, data orders or hyper-parameters) usually lie in
one basin of the loss, so the mean of their weights is itself a good model: a typical run rather than a lucky or an
unlucky one (on the small benchmarks here it scored near the runs' mean), at the inference cost of one model.
Models trained from different random initialisations do not share a basin: averaging them gives noise.
`average_models` / `hfgpt average`:

    hfgpt average --model_dirs out/spam-s1 out/spam-s2 out/spam-s3 --output_dir out/spam-soup
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import files
from ..docs_smoke import scale_down


def _model_class(config: dict, model_dir: Path):
    """The class named in config.json's `architectures` (hfgpt's own, or transformers')."""
    import transformers

    import hfgpt

    names = config.get("architectures") or []
    for name in names:
        found = getattr(hfgpt, name, None) or getattr(transformers, name, None)
        if found is not None:
            return found
    raise ValueError(f"{model_dir}/config.json names no model class hfgpt or transformers knows "
                     f"(architectures: {names or 'none'}).")


def check_soup_ingredients(model_dirs: Sequence[str | os.PathLike]) -> list[dict]:
    """The configs of `model_dirs`, after checking that they are model directories of one architecture."""
    from .common import config_differences

    if len(model_dirs) < 2:
        raise ValueError(f"Averaging needs at least two model directories, got {len(model_dirs)}.")
    configs = []
    for model_dir in map(Path, model_dirs):
        config = files.read_json(model_dir / "config.json")
        if config is None:
            raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json). Pass the output "
                                    "directories of training runs, e.g. hfgpt classify's --output_dir.")
        configs.append(config)
    first_class = _model_class(configs[0], Path(model_dirs[0]))
    reference = first_class.config_class.from_dict(configs[0])
    for model_dir, config in zip(model_dirs[1:], configs[1:]):
        differences = config_differences(config, reference)
        if config.get("architectures") != configs[0].get("architectures"):
            differences["architectures"] = (config.get("architectures"), configs[0].get("architectures"))
        if differences:
            listed = ", ".join(f"{key}: {new!r} in {model_dirs[0]}, {old!r} in {model_dir}"
                               for key, (old, new) in list(differences.items())[:8])
            raise ValueError(f"Only models of one architecture can be averaged; {model_dir} differs ({listed}).")
    return configs


@torch.no_grad()
def average_models(model_dirs: Sequence[str | os.PathLike], output_dir: str | os.PathLike | None = None):
    """The uniform average of the weights of `model_dirs` (same architecture, ideally fine-tuned from the same
    starting weights: averaging models trained from different random initialisations gives noise). Floating-point
    weights are averaged; anything else (integer buffers) must be equal and is kept. Returns the averaged model,
    in the class its config names; with `output_dir`, also saves it there as a complete model directory (weights as
    safetensors, config, tokenizer and chat template of the first model, a training summary naming the ingredients,
    and a model card). Only safetensors weights are read."""
    configs = check_soup_ingredients(model_dirs)
    model_class = _model_class(configs[0], Path(model_dirs[0]))
    soup = model_class.from_pretrained(model_dirs[0], use_safetensors=True)
    first = soup.state_dict()
    total = {name: tensor.detach().double().clone() if tensor.is_floating_point() else tensor
             for name, tensor in first.items()}
    for model_dir in model_dirs[1:]:
        state = model_class.from_pretrained(model_dir, use_safetensors=True).state_dict()
        for name, tensor in state.items():
            if name not in total or tensor.shape != total[name].shape:
                raise ValueError(f"{model_dir}: weight {name} {tuple(tensor.shape)} does not match "
                                 f"{model_dirs[0]}'s ({tuple(total[name].shape) if name in total else 'absent'}).")
            if tensor.is_floating_point():
                total[name] += tensor.double()
            elif not torch.equal(tensor, total[name]):
                raise ValueError(f"{model_dir}: {name} differs from {model_dirs[0]}'s and is not a weight that can "
                                 "be averaged.")
    soup.load_state_dict({name: (tensor / len(model_dirs)).to(first[name].dtype) if tensor.is_floating_point()
                          else tensor for name, tensor in total.items()})
    if output_dir is not None:
        save_soup(soup, model_dirs, output_dir)
    return soup


def save_soup(soup, model_dirs: Sequence[str | os.PathLike], output_dir: str | os.PathLike) -> Path:
    """Save an averaged model as a complete model directory: the first ingredient's tokenizer, a training summary
    naming every ingredient (the card lists them), and the card."""
    from ..evaluation.loading import load_tokenizer
    from ..hub import finish_model_dir
    from .common import write_training_summary

    output_dir = Path(output_dir)
    soup.save_pretrained(output_dir)
    first = Path(model_dirs[0])
    if any((first / name).is_file() for name in files.TOKENIZER_FILES):
        load_tokenizer(first).save_pretrained(output_dir)
    ingredient = files.read_json(first / files.TRAINING_SUMMARY) or {}
    write_training_summary(output_dir, {
        "task": ingredient.get("task", "weight average"),
        "base_model": ingredient.get("base_model"),
        "weight_average": {"method": "uniform average of the weights (model soup)",
                           "models": [str(Path(model_dir)) for model_dir in model_dirs]},
    })
    finish_model_dir(output_dir)
    return output_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hfgpt average", description="Average the weights of models fine-tuned from the same starting weights "
        "(a model soup) into one model directory.")
    parser.add_argument("--model_dirs", nargs="+", required=True,
                        help="Two or more model directories of one architecture (e.g. runs with other seeds).")
    parser.add_argument("--output_dir", required=True, help="Where the averaged model goes.")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Replace a model already in --output_dir.")
    args = scale_down("hfgpt average", parser.parse_args(argv))
    output_dir = Path(args.output_dir)
    if (output_dir / "config.json").is_file() and not args.overwrite_output_dir:
        parser.error(f"{output_dir} already holds a model; pass --overwrite_output_dir to replace it.")
    try:
        average_models(args.model_dirs, output_dir)
    except (FileNotFoundError, ValueError) as error:
        print(f"hfgpt average: {error}", file=sys.stderr)
        return 2
    print(f"Averaged {len(args.model_dirs)} models into {output_dir}.")
    return 0

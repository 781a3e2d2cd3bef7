"""Recipes: one YAML file says what to train; `hfgpt run` runs it, stage by stage, resumably.

    hfgpt run recipes/chat.yaml
    hfgpt run recipes/chat.yaml --set pretrain.learning_rate=3e-4 --set output_dir=runs/chat-lr3e-4
    hfgpt run recipes/chat.yaml --dry_run        # check the whole recipe and show what would run; trains nothing

A recipe holds `output_dir`, an optional `data` section (files made from other files: rows by position, or a text
corpus from row fields) and one section per stage, run in this order:

    tokenizer  pretrain  sft  dpo  classify  eval  card  push

A stage's section takes exactly the arguments of its own command (`hfgpt pretrain --help`, ...): the same dataclasses
parse them, so there is no second spelling of any option. The runner sets what connects the stages: every stage
writes into OUTPUT_DIR/<stage>; a stage that starts from a model reads the previous stage's model unless its section
names one (`model_name_or_path`); pretraining reads the tokenizer stage's tokenizer. `${output_dir}` and
`${data.NAME}` in a value expand to the output directory and to a file of the data section.

Before anything trains, the whole recipe is checked: unknown stages and fields (with the nearest spelling), values of
the wrong type, input models and data files that do not exist; each error names the recipe file and line.

Each stage leaves OUTPUT_DIR/<stage>/recipe_stage.json: its resolved arguments, the fingerprints of the files it
reads and the recipe's hash. Running the recipe again skips a stage whose record is complete and unchanged, resumes
an interrupted one from its last complete checkpoint, and re-runs (saying why) a stage whose arguments or input files
changed, with every stage after it. At the end: OUTPUT_DIR/summary.md and summary.json (per stage: wall time,
tokens/s, metrics) and loss_curves.png (every training stage's loss).

Stages run in this process, by calling the command's own `main(argv)`, as `bench/alignment.py` always ran the three
training stages: no interpreter and library start-up per stage (seconds each, which would dominate small recipes),
and the caller's settings (torch threads) hold for every stage. A stage whose section has `launch:` (options of
`accelerate launch`, e.g. `num_processes: 2`) runs as `accelerate launch -m hfgpt.cli <command> ...` instead:
several processes cannot be started from inside one, and the launcher is then exactly the one users run by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import enum
import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import docs_smoke, files

STAGES = ("tokenizer", "pretrain", "sft", "dpo", "classify", "eval", "card", "push")
MODEL_STAGES = ("pretrain", "sft", "dpo", "classify")  # stages whose output directory is a model
RESUMABLE_STAGES = ("pretrain", "sft", "dpo", "classify")  # Trainer runs: they checkpoint and resume
TOP_LEVEL_KEYS = ("output_dir", "data")
DATA_KEYS = ("from", "rows", "text")
LAUNCH_KEY = "launch"  # in a training stage's section: `accelerate launch` options
EVALUATIONS = ("perplexity", "rouge", "classification")
# set by the runner for every stage; a recipe that sets them is told why not
RUNNER_FIELDS = {
    "output_dir": "each stage writes into OUTPUT_DIR/<stage>; set the recipe's top-level output_dir",
    "overwrite_output_dir": "the runner replaces a stage's output when its arguments change",
    "resume_from_checkpoint": "the runner resumes an interrupted stage from its last complete checkpoint",
}
# fields that name data files the stage reads: checked before training, fingerprinted into the stage's record
DATA_FILE_FIELDS = ("train_file", "validation_file", "eval_prompts_file", "file", "prompts_file", "predictions_file")
_FILE_ROLES = {"train_file": "training", "validation_file": "validation", "eval_prompts_file": "evaluation prompts",
               "file": "evaluation", "prompts_file": "prompts", "predictions_file": "predictions"}
TOKENIZER_FIELDS = ("train_file", "validation_file", "dataset_name", "dataset_config_name", "text_column", "sample_by",
                    "validation_split_percentage", "preset", "vocab_size", "tokenizer_max_chars",
                    "default_corpus_max_chars")
PRETRAIN_DATA_FIELDS = ("train_file", "validation_file", "dataset_name", "dataset_config_name", "text_column",
                        "sample_by", "validation_split_percentage", "default_corpus_max_chars")

RECORD = "recipe_stage.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
LOSS_CURVES = "loss_curves.png"
DATA_DIR = "data"
_SUBSTITUTION = re.compile(r"\$\{([^}]*)\}")


class RecipeError(ValueError):
    """The recipe cannot run as written; the message names the file and line (or the --set override)."""


# --- reading the YAML, with line numbers ------------------------------------------------------------------------


class Locations:
    """Where each value of a recipe came from: `file:line` of its YAML node, or the `--set` override that set it."""

    def __init__(self, path: Path, root: yaml.Node | None):
        self.path, self.root, self.overrides = path, root, {}

    def __call__(self, *keys) -> str:
        for depth in range(len(keys), 0, -1):
            if keys[:depth] in self.overrides:
                return self.overrides[keys[:depth]]
        node, line = self.root, 1
        for key in keys:
            child = _child(node, key)
            if child is None:
                break
            (key_node, node) = child
            line = (key_node or node).start_mark.line + 1
        return f"{self.path}:{line}"


def _child(node, key):
    """(key node, value node) of `key` in a mapping node, or (None, item node) of an index in a sequence node."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == str(key):
                return key_node, value_node
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
        return None, node.value[key]
    return None


def _check_duplicate_keys(node, path: Path) -> None:
    """PyYAML keeps the last of two equal keys without a word; a recipe with two `learning_rate:` is a mistake."""
    if isinstance(node, yaml.MappingNode):
        seen = {}
        for key_node, value_node in node.value:
            if key_node.value in seen:
                raise RecipeError(f"{path}:{key_node.start_mark.line + 1}: {key_node.value!r} is given twice (also at "
                                  f"line {seen[key_node.value]}); keep one.")
            seen[key_node.value] = key_node.start_mark.line + 1
            _check_duplicate_keys(value_node, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, path)


def load_recipe_file(path: str | os.PathLike) -> tuple[dict, Locations, str]:
    """The recipe as a dict, where each value is in the file, and the file's sha256."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"Recipe {path}: no such file" + (" (the shipped recipes are in recipes/)"
                                                             if not path.parent.name else "") + ".")
    text = path.read_text(encoding="utf-8")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_duplicate_keys(node, path)
        data = loader.construct_document(node) if node is not None else {}
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{line}: not valid YAML: {error.problem or error}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: a recipe is a mapping of sections (output_dir, data, {', '.join(STAGES)}), "
                          f"not a {type(data).__name__}.")
    return data, Locations(path, node), hashlib.sha256(text.encode()).hexdigest()


def apply_overrides(recipe: dict, overrides: Sequence[str], where: Locations) -> None:
    """`--set stage.field=value` (the value read as YAML: 3e-4, true, [a, b]); list items by index (eval.rouge.0.x)."""
    for override in overrides:
        if "=" not in override:
            raise RecipeError(f"--set {override}: expected KEY=VALUE, e.g. --set pretrain.learning_rate=3e-4.")
        dotted, text = override.split("=", 1)
        keys = [int(key) if key.isdigit() else key for key in dotted.strip().split(".")]
        if any(key == "" for key in keys):
            raise RecipeError(f"--set {override}: {dotted!r} is not a dotted key like pretrain.learning_rate.")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise RecipeError(f"--set {override}: the value is not valid YAML ({error}).") from None
        node = recipe
        for depth, key in enumerate(keys):
            prefix = ".".join(map(str, keys[:depth + 1]))
            if isinstance(node, list) and not (isinstance(key, int) and key < len(node)):
                raise RecipeError(f"--set {override}: {prefix} is not an item of the list there ({len(node)} items).")
            if not isinstance(node, (dict, list)):
                raise RecipeError(f"--set {override}: {'.'.join(map(str, keys[:depth]))} holds a value, not a "
                                  "section.")
            if depth == len(keys) - 1:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
        where.overrides[tuple(keys)] = f"--set {override}"


def _substitute(value, variables: dict[str, str], where: str):
    """`${output_dir}` and `${data.NAME}` in strings (lists and mappings recursively)."""
    if isinstance(value, str):
        def replace(match):
            name = match.group(1).strip()
            if name not in variables:
                known = ", ".join(f"${{{key}}}" for key in variables)
                raise RecipeError(f"{where}: unknown ${{{name}}}{_suggest(name, variables)}; known: {known}.")
            return variables[name]
        return _SUBSTITUTION.sub(replace, value)
    if isinstance(value, list):
        return [_substitute(item, variables, where) for item in value]
    if isinstance(value, dict):
        return {key: _substitute(item, variables, where) for key, item in value.items()}
    return value


def _suggest(name: str, allowed) -> str:
    close = difflib.get_close_matches(str(name), [str(item) for item in allowed], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- the stage commands ---------------------------------------------------------------------------------------------


@dataclass
class TokenizerOutputArguments:
    output_dir: str = field(metadata={"help": "Where the tokenizer is saved."})


def _parser(*classes) -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    return HfArgumentParser(classes)


def _pretrain_parser():
    from .training.pretrain import PretrainArguments, PretrainingArguments

    return _parser(PretrainArguments, PretrainingArguments)


def _sft_parser():
    from .training.alignment import AlignmentArguments, HFGPTSFTConfig
    from .training.peft import PeftArguments

    return _parser(AlignmentArguments, PeftArguments, HFGPTSFTConfig)


def _dpo_parser():
    from .training.alignment import DPOArguments, HFGPTDPOConfig
    from .training.peft import PeftArguments

    return _parser(DPOArguments, PeftArguments, HFGPTDPOConfig)


def _classify_parser():
    from .training.classification import ClassificationArguments, ClassificationTrainingArguments
    from .training.peft import PeftArguments

    return _parser(ClassificationArguments, PeftArguments, ClassificationTrainingArguments)


def _tokenizer_parser():
    from .training.pretrain import PretrainArguments

    return _parser(PretrainArguments, TokenizerOutputArguments)


def _eval_parser(evaluation: str):
    from .evaluation import cli

    classes = {"perplexity": cli.PerplexityArguments, "rouge": cli.RougeArguments,
               "classification": cli.ClassificationArguments}
    return lambda: _parser(classes[evaluation])


def _card_parser():
    from .cards import argument_parser

    return argument_parser()


def _push_parser():
    from .hub import argument_parser

    return argument_parser()


def _main(module: str, function: str, *prefix: str) -> Callable[[list[str]], int]:
    """The command's own entry point, imported when the stage runs."""
    def run(argv: list[str]) -> int:
        import importlib

        return getattr(importlib.import_module(module), function)([*prefix, *argv]) or 0
    return run


@dataclass(frozen=True)
class Command:
    """How a stage runs: the command a user would type, its argument parser (the command's own dataclasses) and its
    entry point."""

    name: str  # "hfgpt pretrain"
    cli: tuple[str, ...]  # the arguments of `hfgpt` (and of `accelerate launch -m hfgpt.cli`) before the stage's own
    parser: Callable[[], argparse.ArgumentParser]
    main: Callable[[list[str]], int]
    allowed: tuple[str, ...] | None = None  # only these fields (None: every field of the parser)


def stage_command(stage: str, evaluation: str | None = None) -> Command:
    if stage == "tokenizer":
        return Command("(tokenizer stage of hfgpt run)", (), _tokenizer_parser, tokenizer_main,
                       allowed=(*TOKENIZER_FIELDS, "output_dir"))
    if stage == "eval":
        return Command(f"hfgpt eval {evaluation}", ("eval", evaluation), _eval_parser(evaluation),
                       _main("hfgpt.evaluation.cli", "main", evaluation))
    table = {
        "pretrain": (_pretrain_parser, "hfgpt.training.pretrain", "main"),
        "sft": (_sft_parser, "hfgpt.training.alignment", "sft_main"),
        "dpo": (_dpo_parser, "hfgpt.training.alignment", "dpo_main"),
        "classify": (_classify_parser, "hfgpt.training.classification", "main"),
        "card": (_card_parser, "hfgpt.cards", "main"),
        "push": (_push_parser, "hfgpt.hub", "main"),
    }
    parser, module, function = table[stage]
    return Command(f"hfgpt {stage}", (stage,), parser, _main(module, function))


def tokenizer_main(argv: list[str]) -> int:
    """The tokenizer stage: the byte-level BPE `hfgpt pretrain` would train (same rows, same trainer, its own data
    arguments), saved on its own so that later stages and other recipes can share it."""
    from types import SimpleNamespace

    from .data.sources import DataError
    from .training.pretrain import load_or_train_tokenizer, load_training_rows

    args, output = _tokenizer_parser().parse_args_into_dataclasses(args=argv)
    try:
        raw, _ = load_training_rows(args)
    except (DataError, FileNotFoundError) as error:
        print(f"hfgpt run (tokenizer stage): error: {error}", file=sys.stderr)
        return 1
    single_process = SimpleNamespace(world_size=1, process_index=0, disable_tqdm=False)
    tokenizer, source = load_or_train_tokenizer(args, single_process, raw, None)
    tokenizer.save_pretrained(output.output_dir)
    files.write_json(Path(output.output_dir) / files.TRAINING_SUMMARY,
                     {"task": "tokenizer training", "tokenizer": source, "vocab_size": len(tokenizer)})
    print(f"Saved the tokenizer ({len(tokenizer)} tokens) to {output.output_dir}.")
    return 0


# --- checking one section against its command's parser ----------------------------------------------------------


def _parser_fields(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """field name -> its argparse action (options and positionals; not --help, not --no_x complements)."""
    actions = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.dest in actions:
            continue
        if action.option_strings and not any(option == f"--{action.dest}" for option in action.option_strings):
            continue  # `--no_foo` (store_false for foo) or an alias
        actions[action.dest] = action
    return actions


def _json_safe(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _tokens(value) -> list[str]:
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, dict):
        return [json.dumps(value)]
    if isinstance(value, list):
        return [token for item in value for token in _tokens(item)]
    return [str(value)]


def check_field(name: str, value, action: argparse.Action, where: str):
    """`value` (from YAML) as the command line would parse it: its tokens, and the value they mean (JSON-safe).
    Raises RecipeError naming the field and what it takes."""
    is_list = action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1
    if isinstance(value, list) and not is_list:
        raise RecipeError(f"{where}: {name} takes one value, not a list ({value!r}).")
    if isinstance(value, dict) and not (action.type in (None, str) or "dict" in str(action.type)):
        raise RecipeError(f"{where}: {name} takes one value, not a mapping.")
    if action.nargs == 0:  # a flag (store_true): only true/false make sense
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: {name} is a flag: write true or false, not {value!r}.")
        return ([] if value else None), value
    tokens = _tokens(value)
    if is_list and not tokens and action.nargs == "+":
        raise RecipeError(f"{where}: {name} needs at least one value.")
    parsed = []
    for token in tokens:
        try:
            converted = action.type(token) if action.type else token
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            _check_not_yaml_boolean(name, value, action, where)
            kind = getattr(action.type, "__name__", "value")
            kind = {"string_to_bool": "true or false", "<lambda>": "one of the choices"}.get(kind, kind)
            raise RecipeError(f"{where}: {name}: {token!r} is not a valid {kind}"
                              + (f" (choices: {', '.join(map(str, action.choices))})" if action.choices else "")
                              + ".") from None
        if action.choices is not None and converted not in action.choices:
            _check_not_yaml_boolean(name, value, action, where)
            raise RecipeError(f"{where}: {name}: {token!r} is not one of {', '.join(map(str, action.choices))}"
                              f"{_suggest(token, [str(choice) for choice in action.choices])}.")
        parsed.append(converted)
    return tokens, _json_safe(parsed if is_list else parsed[0])


def _check_not_yaml_boolean(name: str, value, action: argparse.Action, where: str) -> None:
    """`eval_strategy: no` is false to YAML (1.1 reads yes/no/on/off as booleans): say so, not 'false is invalid'."""
    if isinstance(value, bool):
        raise RecipeError(f"{where}: {name}: YAML reads this value as {str(value).lower()}; put it in quotes (e.g. "
                          "\"no\")" + (f", one of {', '.join(map(str, action.choices))}" if action.choices else "")
                          + ".")


@dataclass
class Invocation:
    """One call of a command: what a user would type, and the arguments as parsed (the stage's record)."""

    command: Command
    fields: dict[str, Any]  # field -> YAML value, resolved (what the recipe asks for)
    arguments: dict[str, Any]  # field -> the value the command parses from it (JSON-safe; compared between runs)
    argv: list[str]
    where: Locations
    keys: tuple  # the section's keys in the recipe ("pretrain",) or ("eval", "rouge", 0)

    def command_line(self, launch: dict | None = None, extra: Sequence[str] = ()) -> list[str]:
        """What runs: `hfgpt <command> ...`, or with `launch` `accelerate launch <options> -m hfgpt.cli <command> ...`
        (the tokenizer stage has no command of its own: it runs in `hfgpt run`)."""
        if launch:
            return ["accelerate", "launch", *launch_argv(launch), "-m", "hfgpt.cli", *self.command.cli, *self.argv,
                    *extra]
        return [*(["hfgpt", *self.command.cli] if self.command.cli else [self.command.name]), *self.argv, *extra]

    def shell(self, launch: dict | None = None, extra: Sequence[str] = ()) -> str:
        return shlex.join(self.command_line(launch, extra))


def build_invocation(command: Command, section: dict, where: Locations, keys: tuple,
                     runner_set: Sequence[str] = ()) -> Invocation:
    """Check a section's fields against the command's parser (names, types, then the dataclasses' own checks by a
    full parse) and build its argv. `runner_set`: the fields the runner filled in (never the recipe's mistake)."""
    parser = command.parser()
    actions = _parser_fields(parser)
    allowed = command.allowed or tuple(actions)
    argv, positionals, arguments = [], [], {}
    for name, value in section.items():
        location = where(*keys, name)
        if name in RUNNER_FIELDS and name in actions and name not in runner_set:  # (an eval entry's)
            raise RecipeError(f"{location}: {name} is set by the recipe runner ({RUNNER_FIELDS[name]}); remove it.")
        if name not in allowed or name not in actions:
            listed = (", ".join(sorted(allowed)) if len(allowed) <= 30 else
                      f"the options of `{command.name} --help`")
            raise RecipeError(f"{location}: unknown field {name!r} for the {keys[0]} stage"
                              f"{_suggest(name, allowed)}. Allowed: {listed}.")
        if value is None:
            continue  # null: the command's default
        action = actions[name]
        tokens, arguments[name] = check_field(name, value, action, location)
        if tokens is None:
            continue  # a flag set to false
        if action.option_strings:
            argv += [f"--{name}", *tokens]
        else:
            positionals += tokens
    argv = [*positionals, *argv]
    _check_whole(command, parser, argv, section, where, keys)
    return Invocation(command, dict(section), arguments, argv, where, keys)


def _check_whole(command: Command, parser, argv: list[str], section: dict, where: Locations, keys: tuple) -> None:
    """Parse the argv as the command will, into its dataclasses: their own checks (`__post_init__`) run now, before
    anything trains. The error points at the earliest line of the fields it names (else at the section)."""
    from transformers import HfArgumentParser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            if isinstance(parser, HfArgumentParser):
                parser.parse_args_into_dataclasses(args=argv)
            else:
                parser.parse_args(argv)
        return
    except SystemExit:
        lines = stderr.getvalue().strip().splitlines()
        message = lines[-1].split("error: ", 1)[-1] if lines else "invalid arguments"
    except (ValueError, TypeError) as error:
        message = str(error)
    named = [name for name in section if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message)]
    places = sorted((where(*keys, name) for name in named), key=lambda place: (len(place), place))
    raise RecipeError(f"{places[0] if places else where(*keys)}: {command.name}: {message}") from None


# --- the plan: every stage resolved and checked -----------------------------------------------------------------------


@dataclass
class DataFile:
    name: str
    sources: list[str]
    rows: str | None
    text: list[str] | None
    path: Path
    where: Locations
    keys: tuple


@dataclass
class Stage:
    name: str
    output_dir: Path
    invocations: list[Invocation]
    inputs: dict[str, dict]  # data file path -> fingerprint (filled in when the data exists)
    launch: dict | None = None
    model_dir: Path | None = None  # the model this stage leaves behind (model stages) or works on (eval, card, push)

    @property
    def resumable(self) -> bool:
        return self.name in RESUMABLE_STAGES

    def record_key(self) -> dict:
        return {"invocations": [{"command": inv.command.name, "arguments": inv.arguments}
                                for inv in self.invocations], "launch": self.launch}


@dataclass
class Plan:
    recipe_path: Path
    recipe_sha256: str
    output_dir: Path
    data: list[DataFile]
    stages: list[Stage]
    where: Locations

    @property
    def final_model(self) -> Path | None:
        models = [stage.output_dir for stage in self.stages if stage.name in MODEL_STAGES]
        return models[-1] if models else None


def plan_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Plan:
    """Read, check and resolve a recipe; nothing is written. Raises RecipeError (file and line)."""
    recipe, where, digest = load_recipe_file(path)
    apply_overrides(recipe, overrides, where)
    for key in recipe:
        if key not in (*TOP_LEVEL_KEYS, *STAGES):
            raise RecipeError(f"{where(key)}: unknown section {key!r}{_suggest(key, (*TOP_LEVEL_KEYS, *STAGES))}. "
                              f"A recipe has output_dir, data and the stages {', '.join(STAGES)}.")
    present = [key for key in recipe if key in STAGES]
    expected = [stage for stage in STAGES if stage in present]
    if present != expected:
        first = next(a for a, b in zip(present, expected) if a != b)
        raise RecipeError(f"{where(first)}: stages run in the order {', '.join(STAGES)}; this recipe lists them as "
                          f"{', '.join(present)}. Put them in that order, so the file reads as it runs.")
    if not present:
        raise RecipeError(f"{where.path}:1: the recipe has no stage; give at least one of {', '.join(STAGES)}.")

    output_dir = recipe.get("output_dir") or f"runs/{Path(path).stem}"
    if not isinstance(output_dir, str):
        raise RecipeError(f"{where('output_dir')}: output_dir is a directory path, not {output_dir!r}.")
    output_dir = Path(output_dir)
    variables = {"output_dir": str(output_dir)}
    data = _plan_data(recipe.get("data"), output_dir / DATA_DIR, where, variables)
    variables.update({f"data.{item.name}": str(item.path) for item in data})
    made = {str(item.path) for item in data}

    stages, previous_model, tokenizer_dir, earlier_models = [], None, None, []
    for name in present:
        section = recipe[name]
        if section is None:
            section = {}
        if not isinstance(section, (dict, list) if name == "eval" else dict):
            raise RecipeError(f"{where(name)}: the {name} section is a mapping of its command's arguments, not "
                              f"{section!r}.")
        section = _substitute(section, variables, where(name))
        stage_dir = output_dir / name
        if name == "eval":
            stage = _plan_eval(section, stage_dir, previous_model, where, output_dir, earlier_models)
        else:
            pretrain = _substitute(dict(recipe.get("pretrain") or {}), variables, where("pretrain"))
            stage = _plan_stage(name, section, stage_dir, previous_model, tokenizer_dir, where, output_dir,
                                pretrain if name == "tokenizer" else None, earlier_models)
        for invocation in stage.invocations:
            _check_data_files(invocation, made)
        stages.append(stage)
        if name in MODEL_STAGES:
            previous_model = stage_dir
            earlier_models.append(stage_dir)
        if name == "tokenizer":
            tokenizer_dir = stage_dir
    return Plan(Path(path), digest, output_dir, data, stages, where)


def _plan_data(section, data_dir: Path, where: Locations, variables: dict) -> list[DataFile]:
    if section is None:
        return []
    if not isinstance(section, dict):
        raise RecipeError(f"{where('data')}: data is a mapping of NAME: {{from: FILE, rows: ..., text: [...]}}.")
    made = []
    for name, entry in section.items():
        keys = ("data", name)
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)):
            raise RecipeError(f"{where(*keys)}: data name {name!r}: use letters, digits, _ and - only (it names a "
                              "file and ${data.NAME}).")
        if not isinstance(entry, dict) or "from" not in entry:
            raise RecipeError(f"{where(*keys)}: data {name}: give `from:` (a file, or a list of files) and optionally "
                              "`rows:` and `text:`.")
        for key in entry:
            if key not in DATA_KEYS:
                raise RecipeError(f"{where(*keys, key)}: data {name}: unknown key {key!r}{_suggest(key, DATA_KEYS)}; "
                                  f"allowed: {', '.join(DATA_KEYS)}.")
        entry = _substitute(entry, variables, where(*keys))
        sources = entry["from"] if isinstance(entry["from"], list) else [entry["from"]]
        for source in sources:
            if not Path(str(source)).is_file():
                raise RecipeError(f"{where(*keys, 'from')}: data {name}: {source} does not exist"
                                  f"{_relative_hint(source)}.")
            if Path(str(source)).suffix.lower() not in files.ROW_FILE_SUFFIXES:
                raise RecipeError(f"{where(*keys, 'from')}: data {name}: {source} is not a row file "
                                  f"({', '.join(files.ROW_FILE_SUFFIXES)}).")
        rows = entry.get("rows")
        if rows is not None and not isinstance(rows, str):
            raise RecipeError(f"{where(*keys, 'rows')}: data {name}: rows is a quoted string like \":-10%\" or "
                              f"\"0:700,800:900\" (unquoted, YAML reads {rows!r}).")
        if rows is not None:
            try:
                select_rows(list(range(100)), str(rows))
            except ValueError as error:
                raise RecipeError(f"{where(*keys, 'rows')}: data {name}: {error}") from None
        text = entry.get("text")
        if text is not None and not (isinstance(text, list) and text and all(isinstance(c, str) for c in text)):
            raise RecipeError(f"{where(*keys, 'text')}: data {name}: text is a list of row fields, e.g. "
                              "[instruction, input, output].")
        suffix = ".txt" if text else ".jsonl"
        made.append(DataFile(str(name), [str(source) for source in sources], None if rows is None else str(rows),
                             text, data_dir / f"{name}{suffix}", where, keys))
    return made


def _relative_hint(path) -> str:
    if Path(str(path)).is_absolute():
        return ""
    return f" (relative paths are read from the current directory, {Path.cwd()})"


def _plan_stage(name: str, section: dict, stage_dir: Path, previous_model: Path | None, tokenizer_dir: Path | None,
                where: Locations, output_dir: Path, pretrain_section: dict | None,
                earlier_models: Sequence[Path]) -> Stage:
    section = dict(section)
    launch = section.pop(LAUNCH_KEY, None)
    if launch is not None:
        if name not in RESUMABLE_STAGES:
            raise RecipeError(f"{where(name, LAUNCH_KEY)}: launch (accelerate launch options) is for the training "
                              f"stages ({', '.join(RESUMABLE_STAGES)}), not {name}.")
        _check_launch(launch, where(name, LAUNCH_KEY))
    for key in RUNNER_FIELDS:
        if key in section:
            raise RecipeError(f"{where(name, key)}: {key} is set by the recipe runner ({RUNNER_FIELDS[key]}); "
                              "remove it.")
    command = stage_command(name)
    runner = {"output_dir": str(stage_dir)}
    if name == "tokenizer":
        # the tokenizer is trained on the rows pretraining reads, unless its section says otherwise
        for key in PRETRAIN_DATA_FIELDS:
            if key not in section and (pretrain_section or {}).get(key) is not None:
                section[key] = pretrain_section[key]
                where.overrides.setdefault((name, key), where("pretrain", key))
    if name == "pretrain" and tokenizer_dir is not None:
        for key in ("tokenizer_name_or_path", "vocab_size"):
            if key in section:
                raise RecipeError(f"{where(name, key)}: the recipe has a tokenizer stage, whose tokenizer pretraining "
                                  f"uses; set {key} there{' (vocab_size)' if key == 'vocab_size' else ''}, or drop "
                                  "the tokenizer stage.")
        runner["tokenizer_name_or_path"] = str(tokenizer_dir)
    if name in ("sft", "dpo", "classify", "card", "push"):
        model_field = "model_dir" if name in ("card", "push") else "model_name_or_path"
        if section.get(model_field) is None:
            if previous_model is None:
                raise RecipeError(f"{where(name)}: the {name} stage needs a model: no earlier stage of the recipe "
                                  f"makes one, so set {model_field} (a model directory or a Hub id).")
            runner[model_field] = str(previous_model)
        else:
            _check_model(str(section[model_field]), where(name, model_field), output_dir, earlier_models)
    model_dir = stage_dir if name in MODEL_STAGES else None
    if name in ("card", "push"):
        model_dir = Path(section.get("model_dir") or runner["model_dir"])
    for key, value in runner.items():
        if name in ("card", "push") and key == "output_dir":
            continue  # they write into the model directory; the stage directory holds the record only
        section[key] = value
        where.overrides.setdefault((name, key), f"{where(name)} (set by the runner)")
    invocation = build_invocation(command, section, where, (name,), runner_set=tuple(runner))
    return Stage(name, stage_dir, [invocation], {}, launch, model_dir)


def _plan_eval(section, stage_dir: Path, previous_model: Path | None, where: Locations, output_dir: Path,
               earlier_models: Sequence[Path]) -> Stage:
    """eval: {perplexity: {...}, rouge: [{...}, {...}], classification: {...}}: each entry one `hfgpt eval` call, on
    the recipe's last model unless it names model_name_or_path."""
    if not isinstance(section, dict) or not section:
        raise RecipeError(f"{where('eval')}: eval maps an evaluation ({', '.join(EVALUATIONS)}) to its arguments (or "
                          "a list of them), e.g. `rouge: {prompts_file: held_out.jsonl}`.")
    invocations = []
    for evaluation, entries in section.items():
        if evaluation not in EVALUATIONS:
            raise RecipeError(f"{where('eval', evaluation)}: unknown evaluation {evaluation!r}"
                              f"{_suggest(evaluation, EVALUATIONS)}; allowed: {', '.join(EVALUATIONS)}.")
        listed = entries if isinstance(entries, list) else [entries]
        for index, entry in enumerate(listed):
            keys = ("eval", evaluation, index) if isinstance(entries, list) else ("eval", evaluation)
            entry = dict(entry or {})
            if not isinstance(entry, dict):
                raise RecipeError(f"{where(*keys)}: the arguments of `hfgpt eval {evaluation}`, as a mapping.")
            if entry.get("model_name_or_path") is None:
                if previous_model is None:
                    raise RecipeError(f"{where(*keys)}: eval {evaluation} needs a model: no earlier stage makes one, "
                                      "so set model_name_or_path.")
                entry["model_name_or_path"] = str(previous_model)
            else:
                _check_model(str(entry["model_name_or_path"]), where(*keys, "model_name_or_path"), output_dir,
                             earlier_models)
            invocations.append(build_invocation(stage_command("eval", evaluation), entry, where, keys))
    return Stage("eval", stage_dir, invocations, {}, None, previous_model)


def _check_model(value: str, where: str, output_dir: Path, earlier: Sequence[Path]) -> None:
    """A model named in the recipe must exist, be made by an earlier stage, or look like a Hub id."""
    path = Path(value)
    if path.exists() or path.resolve() in {model.resolve() for model in earlier}:
        return
    inside = output_dir.resolve() in path.resolve().parents
    hub_like = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", value) and not Path(value.split("/")[0]).exists()
    if hub_like and not inside:
        return
    made = ", ".join(str(model) for model in earlier) or "none"
    raise RecipeError(f"{where}: model {value} does not exist{_relative_hint(value)}, and no earlier stage of the "
                      f"recipe makes it (they make: {made}); name a model directory, an earlier stage's, or a Hub id.")


def _check_data_files(invocation: Invocation, made: set[str]) -> None:
    from .data.sources import expand_data_files, split_file_list

    for name in DATA_FILE_FIELDS:
        value = invocation.fields.get(name)
        if value is None:
            continue
        paths = [path for path in split_file_list(value if isinstance(value, list) else [value]) if path not in made]
        try:
            expand_data_files(paths, _FILE_ROLES[name])
        except FileNotFoundError as error:
            raise RecipeError(f"{invocation.where(*invocation.keys, name)}: {name}: {str(error).rstrip('.')}"
                              f"{_relative_hint(paths[0])}.") from None


def _check_launch(launch, where: str) -> None:
    from accelerate.commands.launch import launch_command_parser

    if not isinstance(launch, dict):
        raise RecipeError(f"{where}: launch is a mapping of `accelerate launch` options, e.g. "
                          "{num_processes: 2, multi_gpu: true}.")
    actions = _parser_fields(launch_command_parser())
    for name, value in launch.items():
        if name not in actions or not actions[name].option_strings:
            raise RecipeError(f"{where}: {name!r} is not an `accelerate launch` option"
                              f"{_suggest(name, [n for n, a in actions.items() if a.option_strings])}.")
        check_field(name, value, actions[name], where)


def launch_argv(launch: dict) -> list[str]:
    from accelerate.commands.launch import launch_command_parser

    actions = _parser_fields(launch_command_parser())
    argv = []
    for name, value in launch.items():
        tokens, _ = check_field(name, value, actions[name], "launch")
        if tokens is not None:
            argv += [actions[name].option_strings[0], *tokens]
    return argv


# --- data files made by the recipe -----------------------------------------------------------------------------------


def select_rows(rows: list, spec: str) -> list:
    """Rows by position, Python's slices separated by commas: ':-10%' (all but the last 10%), '-10%:' (the last 10%),
    '0:700,800:900'. N% is int(len(rows) * N / 100) rows, as `--validation_split_percentage` counts them."""
    picked = []
    for part in spec.split(","):
        if part.count(":") != 1:
            raise ValueError(f"rows {spec!r}: each part is START:END (e.g. ':-10%' or '0:700,800:900'), not {part!r}.")
        bounds = []
        for bound in part.split(":"):
            bound = bound.strip()
            if not bound:
                bounds.append(None)
                continue
            match = re.fullmatch(r"(-?)(\d+(?:\.\d+)?)(%?)", bound)
            if not match:
                raise ValueError(f"rows {spec!r}: {bound!r} is not a row number or a percentage.")
            sign, number, percent = match.groups()
            count = int(len(rows) * float(number) / 100) if percent else int(float(number))
            bounds.append(-count if sign else count)
        picked += rows[slice(*bounds)]
    return picked


def make_data(data: DataFile) -> Path:
    """Write one data file (rows as JSON lines, or a text corpus: each row's `text` fields, the non-empty ones one
    per line, rows separated by blank lines, as pretraining's paragraphs). Unchanged content is not rewritten."""
    rows = [row for source in data.sources for row in files.read_rows(source)]
    if data.rows is not None:
        rows = select_rows(rows, data.rows)
    if not rows:
        raise RecipeError(f"{data.where(*data.keys)}: data {data.name}: no rows selected.")
    if data.text:
        missing = [column for column in data.text if column not in rows[0]]
        if missing:
            raise RecipeError(f"{data.where(*data.keys, 'text')}: data {data.name}: the rows have no field "
                              f"{', '.join(map(repr, missing))}; their fields are {', '.join(map(repr, rows[0]))}.")
        documents = ["\n".join(str(row[column]) for column in data.text if row.get(column) not in (None, ""))
                     for row in rows]
        content = "\n\n".join(documents) + "\n"
    else:
        content = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if data.path.is_file() and data.path.read_text(encoding="utf-8") == content:
        return data.path
    data.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = data.path.with_name(data.path.name + ".tmp")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, data.path)
    return data.path


def _fingerprints(stage: Stage) -> dict[str, dict]:
    from .data.sources import expand_data_files, split_file_list

    found = {}
    for invocation in stage.invocations:
        for name in DATA_FILE_FIELDS:
            value = invocation.fields.get(name)
            if value is not None:
                for path in expand_data_files(split_file_list(value if isinstance(value, list) else [value])):
                    found[path] = files.fingerprint(path)
    return found


# --- running -----------------------------------------------------------------------------------------------------


def _changes(old: dict, new: dict) -> list[str]:
    """What differs between two stage records' keys, for the re-run message."""
    changes = []
    old_calls, new_calls = old.get("invocations", []), new.get("invocations", [])
    if [c["command"] for c in old_calls] != [c["command"] for c in new_calls]:
        return [f"its commands ({', '.join(c['command'] for c in old_calls)} -> "
                f"{', '.join(c['command'] for c in new_calls)})"]
    for old_call, new_call in zip(old_calls, new_calls):
        before, after = old_call["arguments"], new_call["arguments"]
        for key in sorted(before.keys() | after.keys()):
            if before.get(key) != after.get(key):
                changes.append(f"{key} {_show(before.get(key))} -> {_show(after.get(key))}")
    if old.get("launch") != new.get("launch"):
        changes.append(f"launch {old.get('launch')} -> {new.get('launch')}")
    for path in sorted(old.get("inputs", {}).keys() | new.get("inputs", {}).keys()):
        if old.get("inputs", {}).get(path) != new.get("inputs", {}).get(path):
            changes.append(f"the contents of {path}")
    return changes


def _show(value) -> str:
    return "(default)" if value is None else repr(value)


def _stage_complete(stage: Stage, record: dict | None) -> bool:
    if not record or not record.get("complete"):
        return False
    if stage.name in MODEL_STAGES:
        return (stage.output_dir / "config.json").is_file() and (stage.output_dir / files.TRAINING_SUMMARY).is_file()
    if stage.name == "tokenizer":
        return any((stage.output_dir / name).is_file() for name in files.TOKENIZER_FILES)
    return True


@dataclass
class StageOutcome:
    name: str
    status: str  # "ran", "resumed", "skipped", "failed", "not run"
    record: dict | None


def run_recipe(path: str | os.PathLike, overrides: Sequence[str] = (), dry_run: bool = False) -> int:
    """`hfgpt run`: plan, make the data files, run each stage that needs it, write the summary. Returns the exit
    status (0: every stage complete)."""
    plan = plan_recipe(path, overrides)
    print(f"Recipe {plan.recipe_path} -> {plan.output_dir}: {', '.join(stage.name for stage in plan.stages)}")
    if dry_run:
        for stage in plan.stages:
            for invocation in stage.invocations:
                print(f"  {stage.name}: {invocation.shell(stage.launch)}")
        print("Dry run: the recipe checks out; nothing was written or trained.")
        return 0
    for data in plan.data:
        make_data(data)
    outcomes, rerun_from = [], None
    for index, stage in enumerate(plan.stages):
        stage.inputs = _fingerprints(stage)
        key = {**stage.record_key(), "inputs": stage.inputs}
        record = files.read_json(stage.output_dir / RECORD)
        decision, extra = _decide(stage, record, key, rerun_from)
        if decision == "skip":
            print(f"\n[{stage.name}] complete and unchanged: skipped ({stage.output_dir}).")
            outcomes.append(StageOutcome(stage.name, "skipped", record))
            continue
        rerun_from = rerun_from or stage.name
        status = _run_stage(plan, stage, key, extra, decision)
        outcomes.append(status)
        if status.status == "failed":
            outcomes += [StageOutcome(later.name, "not run", files.read_json(later.output_dir / RECORD))
                         for later in plan.stages[index + 1:]]
            break
    write_summary(plan, outcomes)
    failed = [outcome for outcome in outcomes if outcome.status == "failed"]
    return (failed[0].record or {}).get("exit_status", 1) if failed else 0


def _decide(stage: Stage, record: dict | None, key: dict, rerun_from: str | None) -> tuple[str, list[str]]:
    """("skip" | "run" | "resume" | "rerun", extra arguments for the command), with the reason printed."""
    overwrite = ["--overwrite_output_dir", "true"] if stage.resumable and _has_output(stage) else []
    if record is None:
        if stage.resumable and _has_output(stage) and (stage.output_dir / "config.json").is_file():
            print(f"\n[{stage.name}] {stage.output_dir} holds a model this recipe runner did not record: replacing it.")
        return "run", overwrite
    same = {name: record.get(name) for name in key} == key
    if rerun_from is not None:
        print(f"\n[{stage.name}] re-running: it comes after {rerun_from}, which ran again.")
        return "rerun", overwrite
    if not same:
        changes = _changes(record, key)
        print(f"\n[{stage.name}] changed since its last run ({'; '.join(changes) or 'its arguments'}): re-running it "
              "and every stage after it.")
        return "rerun", overwrite
    if _stage_complete(stage, record):
        return "skip", []
    if stage.resumable:
        from .training.common import last_complete_checkpoint

        checkpoint = last_complete_checkpoint(stage.output_dir)
        if checkpoint is not None:
            print(f"\n[{stage.name}] did not complete last time: resuming from {checkpoint}.")
            return "resume", ["--resume_from_checkpoint", "true"]
        print(f"\n[{stage.name}] did not complete last time, and saved no checkpoint: starting it again.")
    return "rerun", overwrite


def _has_output(stage: Stage) -> bool:
    return stage.output_dir.is_dir() and any(path.name != RECORD for path in stage.output_dir.iterdir())


def _run_stage(plan: Plan, stage: Stage, key: dict, extra: list[str], decision: str) -> StageOutcome:
    stage.output_dir.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage.name, "recipe": str(plan.recipe_path), "recipe_sha256": plan.recipe_sha256, **key,
              "commands": [invocation.shell(stage.launch, extra) for invocation in stage.invocations],
              "complete": False,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    previous = files.read_json(stage.output_dir / RECORD) or {}
    before = _eval_results_snapshot(stage)
    files.write_json(stage.output_dir / RECORD, record)
    started = time.time()
    for invocation in stage.invocations:
        print(f"\n[{stage.name}] {invocation.shell(stage.launch, extra)}", flush=True)
        status = _call(stage, invocation, extra if stage.resumable else [])
        if status != 0:
            record.update(exit_status=status, wall_time_seconds=round(time.time() - started, 1))
            files.write_json(stage.output_dir / RECORD, record)
            how = ("interrupted" if status == 130 else f"failed (exit status {status})")
            print(f"\nhfgpt run: the {stage.name} stage {how}. Run `hfgpt run {plan.recipe_path}` again (same "
                  "arguments) to continue: complete stages are skipped"
                  + (", this one resumes from its last complete checkpoint." if stage.resumable else "."),
                  file=sys.stderr)
            return StageOutcome(stage.name, "failed", record)
    # a resumed stage's wall time includes the interrupted attempt's
    earlier = previous.get("wall_time_seconds", 0) if decision == "resume" else 0
    record.update(complete=True, wall_time_seconds=round(time.time() - started + earlier, 1),
                  finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), metrics=_stage_metrics(stage, before))
    files.write_json(stage.output_dir / RECORD, record)
    return StageOutcome(stage.name, "resumed" if decision == "resume" else "ran", record)


def _call(stage: Stage, invocation: Invocation, extra: list[str]) -> int:
    if stage.launch:
        # `accelerate launch` of the interpreter running this (its venv), not whichever is first on PATH
        command = [sys.executable, "-m", "accelerate.commands.launch",
                   *invocation.command_line(stage.launch, extra)[2:]]
        try:
            return subprocess.run(command, check=False).returncode
        except KeyboardInterrupt:
            return 130
    try:
        return int(invocation.command.main([*invocation.argv, *extra]) or 0)
    except SystemExit as exit_:  # argparse's error in the command (already printed)
        return exit_.code if isinstance(exit_.code, int) else 1
    except KeyboardInterrupt:
        return 130


# --- the summary -----------------------------------------------------------------------------------------------------


def _eval_results_snapshot(stage: Stage) -> dict:
    if stage.name != "eval":
        return {}
    models = {inv.fields.get("model_name_or_path") for inv in stage.invocations}
    return {model: files.read_json(Path(model) / files.EVAL_RESULTS, default={}) or {}
            for model in models if model and Path(model).is_dir()}


def _stage_metrics(stage: Stage, before: dict) -> dict:
    """The numbers a stage produced: its training summary's final metrics and speed, its eval results (for the
    eval stage: the entries it added or changed)."""
    metrics = {}
    if stage.name == "eval":
        for model, old in before.items():
            new = files.read_json(Path(model) / files.EVAL_RESULTS, default={}) or {}
            for name, result in new.items():
                if old.get(name) != result:
                    metrics[f"{Path(model).name}: {name}"] = _numbers(result)
        for invocation in stage.invocations:  # models that had no directory before the stage
            model = invocation.fields.get("model_name_or_path")
            if model and model not in before and Path(model).is_dir():
                for name, result in (files.read_json(Path(model) / files.EVAL_RESULTS, default={}) or {}).items():
                    metrics[f"{Path(model).name}: {name}"] = _numbers(result)
        return metrics
    if stage.name in ("card", "push"):
        card = stage.model_dir / files.MODEL_CARD if stage.model_dir else None
        return {"card": str(card)} if card and card.is_file() else {}
    summary = files.read_json(stage.output_dir / files.TRAINING_SUMMARY, default={}) or {}
    final = summary.get("final_metrics") or {}
    keep = ("train_loss", "eval_loss", "eval_perplexity", "eval_accuracy", "eval_f1", "global_step")
    metrics.update({key: final[key] for key in keep if key in final})
    if stage.name == "tokenizer" and "vocab_size" in summary:
        metrics["vocab_size"] = summary["vocab_size"]
    speed = summary.get("speed") or {}
    if "tokens_per_second" in speed:
        metrics["tokens_per_second"] = speed["tokens_per_second"]
    for name, result in (files.read_json(stage.output_dir / files.EVAL_RESULTS, default={}) or {}).items():
        metrics[name] = _numbers(result)
    return metrics


_RESULT_KEYS = ("perplexity", "rouge1", "rouge2", "rougeL", "reward_accuracy", "reward_margin", "accuracy",
                "precision", "recall", "f1", "num_examples", "num_pairs")


def _numbers(result: dict) -> dict:
    return {key: result[key] for key in _RESULT_KEYS if isinstance(result.get(key), (int, float))}


def write_summary(plan: Plan, outcomes: list[StageOutcome]) -> Path:
    """OUTPUT_DIR/summary.json, summary.md and loss_curves.png; the table is printed too."""
    rows = []
    for outcome in outcomes:
        record = outcome.record or {}
        metrics = dict(record.get("metrics") or {})
        rows.append({"stage": outcome.name, "status": outcome.status, "complete": bool(record.get("complete")),
                     "wall_time_seconds": record.get("wall_time_seconds"),
                     "tokens_per_second": metrics.pop("tokens_per_second", None), "metrics": metrics,
                     "commands": record.get("commands", []), "output_dir": str(plan.output_dir / outcome.name)})
    final = plan.final_model
    card = final / files.MODEL_CARD if final else None
    plot = plot_stage_losses({stage.name: stage.output_dir for stage in plan.stages if stage.name in MODEL_STAGES},
                             plan.output_dir / LOSS_CURVES)
    summary = {"recipe": str(plan.recipe_path), "recipe_sha256": plan.recipe_sha256,
               "output_dir": str(plan.output_dir), "final_model": str(final) if final else None,
               "model_card": str(card) if card and card.is_file() else None,
               "loss_curves": str(plot) if plot else None, "stages": rows}
    files.write_json(plan.output_dir / SUMMARY_JSON, summary)
    markdown = _summary_markdown(summary)
    (plan.output_dir / SUMMARY_MD).write_text(markdown, encoding="utf-8")
    print("\n" + markdown)
    return plan.output_dir / SUMMARY_MD


def _format_metrics(metrics: dict) -> str:
    parts = []
    for name, value in metrics.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{key} {_number(item)}" for key, item in value.items() if key not in
                              ("num_examples", "num_pairs"))
            count = value.get("num_examples") or value.get("num_pairs")
            parts.append(f"{name}: {inner}" + (f" (n={count})" if count else ""))
        else:
            parts.append(f"{name} {_number(value)}")
    return "; ".join(parts)


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _summary_markdown(summary: dict) -> str:
    lines = [f"# Recipe {summary['recipe']}", "", f"Output: `{summary['output_dir']}`; final model: "
             f"`{summary['final_model']}`" + (f" (card: `{summary['model_card']}`)" if summary["model_card"] else ""),
             "", "| stage | status | wall time | tokens/s | metrics |", "|---|---|---|---|---|"]
    for row in summary["stages"]:
        wall = f"{row['wall_time_seconds']:.0f} s" if row["wall_time_seconds"] is not None else ""
        speed = f"{row['tokens_per_second']:,.0f}" if row["tokens_per_second"] else ""
        lines.append(f"| {row['stage']} | {row['status']} | {wall} | {speed} | "
                     f"{_format_metrics(row['metrics']).replace('|', '/')} |")
    lines += ["", "Wall time: the stage's last complete run (a resumed stage: both attempts). Status `skipped`: "
              "complete and unchanged from an earlier run of the recipe, whose numbers are shown."]
    if summary["loss_curves"]:
        lines += ["", f"![loss curves]({Path(summary['loss_curves']).name})"]
    return "\n".join(lines) + "\n"


def plot_stage_losses(stage_dirs: dict[str, Path], path: Path) -> Path | None:
    """One figure, a panel per training stage: its training and validation loss against its optimizer steps (each
    stage's own loss: nats per token for pretraining and SFT, DPO's objective, a classifier's per example)."""
    histories = {name: files.read_json(directory / files.LOG_HISTORY_JSON, default=[]) or []
                 for name, directory in stage_dirs.items()}
    histories = {name: history for name, history in histories.items()
                 if any("loss" in entry or "eval_loss" in entry for entry in history)}
    if not histories:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(histories), figsize=(4.2 * len(histories), 3.6), dpi=110, squeeze=False)
    for axis, (name, history) in zip(axes[0], histories.items()):
        train = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry and "step" in entry]
        evals = [(entry["step"], entry["eval_loss"]) for entry in history if "eval_loss" in entry and "step" in entry]
        if train:
            axis.plot(*zip(*train), label="training", linewidth=1.2)
        if evals:
            axis.plot(*zip(*evals), "o-", label="validation", linewidth=1.5, markersize=4)
        axis.set_title(name)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend()
    axes[0][0].set_ylabel("loss")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    figure.savefig(tmp)
    plt.close(figure)
    os.replace(tmp, path)
    return path


# --- command line -----------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hfgpt run", description="Run a recipe: one YAML file with a section per stage (tokenizer, pretrain, "
        "sft, dpo, classify, eval, card, push), each taking its command's own arguments. Complete stages are "
        "skipped, interrupted ones resumed, changed ones re-run with the stages after them. See docs/recipes.md.")
    parser.add_argument("recipe", help="The recipe file (recipes/*.yaml are shipped with hfgpt).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Change one value of the recipe, e.g. --set pretrain.learning_rate=3e-4 or "
                             "--set output_dir=runs/try2 (repeat for several).")
    parser.add_argument("--dry_run", action="store_true",
                        help="Check the recipe and print each stage's command; write and train nothing.")
    args = parser.parse_args(argv)
    try:
        if docs_smoke.mode() == "parse":  # the docs tests: check the whole recipe, run nothing
            plan_recipe(args.recipe, args.overrides)
            docs_smoke.scale_down("hfgpt run", args)
        return run_recipe(args.recipe, args.overrides, dry_run=args.dry_run)
    except RecipeError as error:
        print(f"hfgpt run: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # between stages, or while the data files are made
        print(f"\nhfgpt run: interrupted. Run `hfgpt run {args.recipe}` again to continue: complete stages are "
              "skipped.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

"""`hfgpt run` recipes: a tiny recipe end to end, each resume rule (a complete stage skipped, a changed argument or
input file re-runs that stage and the ones after it, a killed stage resumes from its checkpoint), bad input stopped
before any training with the recipe's file and line, the shipped recipes, and recipes/chat.yaml against the
arguments bench/alignment.py used before it ran the recipe."""

import dataclasses
import hashlib
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hfgpt import files
from hfgpt.recipes import RecipeError, main, plan_recipe, select_rows

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
COLOURS = ["red", "blue", "green", "white", "black", "yellow"]


def write_tiny_data(directory: Path) -> None:
    with open(directory / "corpus.txt", "w") as handle:
        for i in range(300):
            handle.write(f"The house number {i} is {COLOURS[i % 6]} and the cat sees {COLOURS[i * 7 % 6]} boats.\n\n")
    with open(directory / "held_out.txt", "w") as handle:
        handle.write("The house number 7 is blue and the cat sees red boats.\n")
    rows = [{"instruction": f"What colour is house {i}?", "input": "", "output": f"House {i} is {COLOURS[i % 6]}."}
            for i in range(24)]
    files.write_jsonl(directory / "instructions.jsonl", rows)
    files.write_jsonl(directory / "preferences.jsonl", [
        {"instruction": row["instruction"], "input": "", "chosen": row["output"], "rejected": "No."} for row in rows])


TRAINING = """\
  per_device_train_batch_size: 4
  report_to: none
  disable_tqdm: true
"""
TINY_RECIPE = f"""\
# every stage, tiny
output_dir: out
data:
  instructions_train: {{from: instructions.jsonl, rows: ":-25%"}}
  instructions_held_out: {{from: instructions.jsonl, rows: "-25%:"}}
tokenizer:
  vocab_size: 300
pretrain:
  train_file: corpus.txt
  preset: tiny
  block_size: 64
  max_steps: 6
  save_steps: 3
  num_samples: 0
  torch_compile: false
{TRAINING}sft:
  train_file: ${{data.instructions_train}}
  validation_file: ${{data.instructions_held_out}}
  max_steps: 2
  max_eval_prompts: 2
  max_new_tokens: 4
{TRAINING}dpo:
  train_file: preferences.jsonl
  max_steps: 2
  max_eval_prompts: 2
  max_new_tokens: 4
{TRAINING}eval:
  perplexity: {{file: held_out.txt}}
  rouge: {{prompts_file: "${{data.instructions_held_out}}", max_new_tokens: 4, max_examples: 2}}
card:
  license: mit
"""


def statuses(output_dir: Path) -> dict:
    return {row["stage"]: row["status"] for row in files.read_json(output_dir / "summary.json")["stages"]}


def test_tiny_recipe_end_to_end_then_skip_then_rerun_what_changed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_tiny_data(tmp_path)
    Path("tiny.yaml").write_text(TINY_RECIPE)
    out = tmp_path / "out"

    assert main(["tiny.yaml"]) == 0
    assert statuses(out) == dict.fromkeys(("tokenizer", "pretrain", "sft", "dpo", "eval", "card"), "ran")
    summary = files.read_json(out / "summary.json")
    rows = {row["stage"]: row for row in summary["stages"]}
    assert rows["pretrain"]["metrics"]["global_step"] == 6 and rows["pretrain"]["metrics"]["eval_perplexity"] > 1
    assert rows["pretrain"]["tokens_per_second"] > 0 and rows["pretrain"]["wall_time_seconds"] > 0
    assert rows["sft"]["metrics"]["rouge"]["num_examples"] == 2
    assert 0 <= rows["dpo"]["metrics"]["preference"]["reward_accuracy"] <= 1
    assert {"dpo: perplexity", "dpo: rouge@instructions_held_out.jsonl"} <= set(rows["eval"]["metrics"])
    assert summary["final_model"] == "out/dpo" and summary["model_card"] == "out/dpo/README.md"
    card = (out / "dpo" / "README.md").read_text()
    assert "license: mit" in card and "Perplexity" in card  # the card was rewritten after the eval stage
    assert (out / "loss_curves.png").stat().st_size > 0
    markdown = (out / "summary.md").read_text()
    assert "| stage | status | wall time | tokens/s | metrics |" in markdown and "| dpo | ran |" in markdown
    # pretraining used the tokenizer stage's tokenizer; the data section's files hold the rows asked for
    assert (out / "pretrain" / "tokenizer.json").read_text() == (out / "tokenizer" / "tokenizer.json").read_text()
    assert len(files.read_rows(out / "data" / "instructions_held_out.jsonl")) == 6
    record = files.read_json(out / "pretrain" / "recipe_stage.json")
    assert record["complete"] and record["recipe_sha256"] == hashlib.sha256(Path("tiny.yaml").read_bytes()).hexdigest()
    assert record["commands"][0].startswith("hfgpt pretrain --train_file corpus.txt")
    assert "--tokenizer_name_or_path out/tokenizer" in record["commands"][0]
    weights = {stage: (out / stage / "model.safetensors").stat().st_mtime_ns for stage in ("pretrain", "sft", "dpo")}

    # the same recipe again: every stage complete and unchanged, nothing runs
    capsys.readouterr()
    assert main(["tiny.yaml"]) == 0
    assert set(statuses(out).values()) == {"skipped"}
    assert "[pretrain] complete and unchanged: skipped" in capsys.readouterr().out
    assert {stage: (out / stage / "model.safetensors").stat().st_mtime_ns for stage in weights} == weights

    # a changed argument re-runs its stage and every stage after it, and says why
    assert main(["tiny.yaml", "--set", "sft.learning_rate=3e-4"]) == 0
    printed = capsys.readouterr().out
    assert "[sft] changed since its last run (learning_rate (default) -> 0.0003)" in printed
    assert "[dpo] re-running: it comes after sft, which ran again." in printed
    assert statuses(out) == {"tokenizer": "skipped", "pretrain": "skipped", "sft": "ran", "dpo": "ran", "eval": "ran",
                             "card": "ran"}
    assert (out / "pretrain" / "model.safetensors").stat().st_mtime_ns == weights["pretrain"]
    assert (out / "sft" / "model.safetensors").stat().st_mtime_ns != weights["sft"]
    assert files.read_json(out / "sft" / "recipe_stage.json")["invocations"][0]["arguments"]["learning_rate"] == 3e-4

    # so does a changed input file (fingerprinted), here the eval stage's
    Path("held_out.txt").write_text("The house number 8 is black and the cat sees green boats.\n")
    assert main(["tiny.yaml", "--set", "sft.learning_rate=3e-4"]) == 0
    assert "[eval] changed since its last run (the contents of held_out.txt)" in capsys.readouterr().out
    assert [stage for stage, status in statuses(out).items() if status == "ran"] == ["eval", "card"]


def test_a_classifier_recipe_pretrain_classify_eval_card(tmp_path, monkeypatch):
    """recipes/spam.yaml's shape, tiny: pretrain on the texts, classify, the held-out scores, the classifier's card."""
    monkeypatch.chdir(tmp_path)
    with open("messages.tsv", "w") as handle:
        handle.write("label\ttext\n")
        for i in range(80):
            handle.write(f"spam\tWIN a FREE prize {i} call now\n" if i % 4 == 0 else
                         f"ham\tsee you at the {COLOURS[i % 6]} house at {i % 12} o'clock\n")
    Path("spam.yaml").write_text(f"""\
output_dir: out
data:
  train: {{from: messages.tsv, rows: ":-20%"}}
  held_out: {{from: messages.tsv, rows: "-20%:"}}
pretrain:
  train_file: ${{data.train}}
  preset: tiny
  vocab_size: 300
  validation_split_percentage: 0
  max_steps: 2
  num_samples: 0
  torch_compile: false
{TRAINING}classify:
  train_file: ${{data.train}}
  validation_file: ${{data.held_out}}
  class_names: ham,spam
  max_steps: 2
  class_weights: balanced
{TRAINING}eval:
  classification: {{file: "${{data.held_out}}", average: binary}}
card: {{}}
""")
    assert main(["spam.yaml"]) == 0
    rows = {row["stage"]: row for row in files.read_json(tmp_path / "out" / "summary.json")["stages"]}
    assert [row["status"] for row in rows.values()] == ["ran"] * 4
    assert rows["classify"]["metrics"]["classification"]["num_examples"] == 16  # the last 20% of 80
    scores = rows["eval"]["metrics"]["classify: classification@held_out.jsonl"]
    assert 0 <= scores["f1"] <= 1 and scores["num_examples"] == 16
    assert "Text Classification" in (tmp_path / "out" / "classify" / "README.md").read_text()


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    import hfgpt.training.pretrain as pretrain
    from hfgpt.recipes import main

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:  # after checkpoint-3 was saved
                os.kill(os.getpid(), signal.SIGKILL)  # no clean-up at all: like the OOM killer or a power cut

    callbacks = pretrain.training_callbacks
    pretrain.training_callbacks = lambda *args, **kwargs: [*callbacks(*args, **kwargs), KillAt()]
    sys.exit(main(sys.argv[1:]))
""")


def test_a_killed_stage_resumes_from_its_last_complete_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_tiny_data(tmp_path)
    Path("tiny.yaml").write_text(f"""\
output_dir: out
pretrain:
  train_file: corpus.txt
  preset: tiny
  vocab_size: 300
  block_size: 64
  max_steps: 6
  save_steps: 3
  num_samples: 0
  torch_compile: false
{TRAINING}card: {{}}
""")
    Path("killed.py").write_text(KILLED_RUN)
    killed = subprocess.run([sys.executable, "killed.py", "tiny.yaml"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    record = files.read_json(Path("out/pretrain/recipe_stage.json"))
    assert record["complete"] is False and (tmp_path / "out/pretrain/checkpoint-3/trainer_state.json").is_file()
    assert not (tmp_path / "out/pretrain/model.safetensors").exists()

    assert main(["tiny.yaml"]) == 0
    assert "[pretrain] did not complete last time: resuming from out/pretrain/checkpoint-3." in capsys.readouterr().out
    assert statuses(tmp_path / "out") == {"pretrain": "resumed", "card": "ran"}
    summary = files.read_json(tmp_path / "out/pretrain/training_summary.json")
    assert summary["resumed_from"] == "checkpoint-3" and summary["final_metrics"]["global_step"] == 6


def test_a_stage_with_launch_runs_through_accelerate_launch(tmp_path, monkeypatch):
    """Two CPU processes over gloo (`--multi_gpu` is accelerate's name for DDP, GPUs or not)."""
    from test_pretrain import free_port

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_tiny_data(tmp_path)
    Path("r.yaml").write_text(f"""\
output_dir: out
pretrain:
  launch: {{multi_gpu: true, num_processes: 2, main_process_port: {free_port()}}}
  train_file: corpus.txt
  preset: tiny
  vocab_size: 300
  block_size: 64
  max_steps: 2
  num_samples: 0
  torch_compile: false
{TRAINING}""")
    assert main(["r.yaml"]) == 0
    record = files.read_json(tmp_path / "out/pretrain/recipe_stage.json")
    assert record["complete"] and record["commands"][0].startswith(
        "accelerate launch --multi_gpu --num_processes 2 --main_process_port ")
    assert " -m hfgpt.cli pretrain --train_file corpus.txt " in record["commands"][0]
    summary = files.read_json(tmp_path / "out/pretrain/training_summary.json")
    assert summary["hyperparameters"]["world_size"] == 2 and summary["hyperparameters"]["global_batch_size"] == 8


# --- bad input: stopped before anything is written or trained, naming the file and line ---------------------------

GOOD_PRETRAIN = "pretrain:\n  train_file: corpus.txt\n  preset: tiny\n"
BAD_RECIPES = {
    "unknown stage": ("output_dir: out\npretrian:\n  preset: tiny\n", 2, "unknown section 'pretrian' (did you mean "
                                                                        "'pretrain'?)"),
    "unknown field": (GOOD_PRETRAIN + "  learning_rat: 0.1\n", 4, "unknown field 'learning_rat' for the pretrain stage "
                                                                  "(did you mean 'learning_rate'?)"),
    "unknown field, short list": ("card:\n  model_dir: corpus.txt\n  licence: mit\n", 3,
                                  "(did you mean 'license'?). Allowed: language, license, model_dir, model_id"),
    "wrong type": (GOOD_PRETRAIN + "  learning_rate: fast\n", 4, "learning_rate: 'fast' is not a valid float"),
    "not a choice": (GOOD_PRETRAIN + "  lr_scheduler_type: cosin\n", 4, "is not one of linear, cosine"),
    "YAML's no": (GOOD_PRETRAIN + "  eval_strategy: no\n", 4, "eval_strategy: YAML reads this value as false; put "
                                                              "it in quotes (e.g. \"no\"), one of no, steps, epoch"),
    "not a bool": (GOOD_PRETRAIN + "  streaming: maybe\n", 4, "streaming: 'maybe' is not a valid true or false"),
    "a list for one value": (GOOD_PRETRAIN + "  learning_rate: [0.1, 0.2]\n", 4, "takes one value, not a list"),
    "the dataclass's own check": (GOOD_PRETRAIN + "  vocab_size: 300\n  tokenizer_name_or_path: tok\n", 4,
                                  "Pass either --tokenizer_name_or_path"),
    "no input model": ("sft:\n  train_file: instructions.jsonl\n", 1, "the sft stage needs a model: no earlier stage"),
    "a missing model": ("sft:\n  model_name_or_path: ./nowhere\n  train_file: instructions.jsonl\n", 2,
                        "model ./nowhere does not exist"),
    "a missing data file": (GOOD_PRETRAIN + "  validation_file: missing.txt\n", 4,
                            "validation_file: These validation files cannot be read: missing.txt (not found)"),
    "a field the runner sets": (GOOD_PRETRAIN + "  output_dir: elsewhere\n", 4, "output_dir is set by the recipe "
                                                                               "runner"),
    "a stage the recipe lacks": ("output_dir: out\n" + GOOD_PRETRAIN + "eval:\n  perplexity: {model_name_or_path: "
                                 "out/sft, file: corpus.txt}\n", 6, "no earlier stage of the recipe makes it (they "
                                                                     "make: out/pretrain)"),
    "stages out of order": ("sft:\n  model_name_or_path: x/y\n" + GOOD_PRETRAIN, 1, "stages run in the order"),
    "a key twice": (GOOD_PRETRAIN + "  preset: mini\n", 4, "'preset' is given twice (also at line 3)"),
    "not YAML": (GOOD_PRETRAIN + "  preset: [tiny\n", 5, "not valid YAML"),
    "a missing data source": ("data:\n  x: {from: nowhere.jsonl}\n" + GOOD_PRETRAIN, 2, "nowhere.jsonl does not exist"),
    "bad rows": ("data:\n  x:\n    from: instructions.jsonl\n    rows: 'first half'\n" + GOOD_PRETRAIN, 4,
                 "rows 'first half': each part is START:END"),
    "unknown substitution": (GOOD_PRETRAIN + "  validation_file: ${data.nope}\n", 1,
                             "unknown ${data.nope}"),
    "unknown evaluation": ("eval:\n  perplexty: {model_name_or_path: x/y, file: corpus.txt}\n", 2,
                           "(did you mean 'perplexity'?)"),
    "a launch option accelerate lacks": (GOOD_PRETRAIN + "  launch: {num_proceses: 2}\n", 4,
                                         "(did you mean 'num_processes'?)"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipes_stop_before_any_work_with_file_and_line(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tiny_data(tmp_path)
    text, line, message = BAD_RECIPES[case]
    Path("bad.yaml").write_text(text)
    with pytest.raises(RecipeError) as error:
        plan_recipe("bad.yaml")
    assert str(error.value).startswith(f"bad.yaml:{line}: "), str(error.value)
    assert message in str(error.value)


def test_a_bad_override_is_named_and_the_command_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_tiny_data(tmp_path)
    Path("r.yaml").write_text("output_dir: out\n" + GOOD_PRETRAIN)
    assert main(["r.yaml", "--set", "pretrain.learning_rate=abc"]) == 1
    assert ("hfgpt run: error: --set pretrain.learning_rate=abc: learning_rate: 'abc' is not a valid float"
            in capsys.readouterr().err)
    assert main(["r.yaml", "--set", "pretrain.preset.size=1"]) == 1
    assert "pretrain.preset holds a value, not a section" in capsys.readouterr().err
    assert not Path("out").exists()


def test_rows_select_by_position_as_validation_split_percentage_does():
    rows = list(range(15))
    assert select_rows(rows, ":-10%") == list(range(14)) and select_rows(rows, "-10%:") == [14]  # int(1.5) = 1
    assert select_rows(rows, "0:3,10:12") == [0, 1, 2, 10, 11]
    assert select_rows(rows, "20%:40%") == [3, 4, 5]


# --- the shipped recipes ------------------------------------------------------------------------------------------

needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data beside the repository")


@needs_shared_data
@pytest.mark.parametrize("recipe", sorted(path.name for path in (REPO / "recipes").glob("*.yaml")))
def test_shipped_recipes_check_out(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # they name ../shared/data relative to the repository's root, as the benches do
    header = (REPO / "recipes" / recipe).read_text().split("\n\n")[0]
    assert re.search(r"(?i)takes [^\n]*minutes|time: not measured", header), "the header says how long it takes"
    plan = plan_recipe(f"recipes/{recipe}", [f"output_dir={tmp_path / 'out'}"])
    assert plan.stages and not (tmp_path / "out").exists()
    if recipe == "gpu.yaml":
        assert plan.stages[0].invocations[0].shell(plan.stages[0].launch).startswith(
            "accelerate launch --config_file train/accelerate/ddp.yaml --num_processes 8 -m hfgpt.cli pretrain ")


def _options_of(command_main) -> set[str]:
    """The --options a command's own --help lists."""
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        command_main(["--help"])
    return set(re.findall(r"(?<![\w-])--(\w+)(?![\w-])", text.getvalue())) - {"help"}


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo", "classify", "eval perplexity", "eval rouge",
                                   "eval classification", "card", "push"])
def test_a_stage_takes_exactly_its_commands_options(stage):
    """The recipe checks a section with the command's own dataclasses: if a command gains a dataclass, this fails."""
    from hfgpt.recipes import _parser_fields, stage_command

    name, _, evaluation = stage.partition(" ")
    command = stage_command(name, evaluation or None)
    from_recipe = {field for field, action in _parser_fields(command.parser()).items() if action.option_strings}
    own = _options_of(command.main)  # the command's own entry point, as `hfgpt <command> --help` runs it
    assert own - {f"no_{option}" for option in from_recipe} == from_recipe  # (--no_x: argparse's off switch for x)


# --- recipes/chat.yaml is bench/alignment.py's run -------------------------------------------------------------------

# The arguments bench/alignment.py built before it became a call of recipes/chat.yaml (commit ceba318), written out.
CHECKPOINTING = {"save_strategy", "save_steps", "save_total_limit"}  # the recipe checkpoints; the bench did not
RUNNER_OWNED = {"overwrite_output_dir"}  # the bench always overwrote; the runner decides per stage


def _old_bench_arguments(output_dir: Path) -> dict:
    from hfgpt.training.alignment import HFGPTDPOConfig, HFGPTSFTConfig
    from hfgpt.training.pretrain import PretrainArguments, PretrainingArguments

    common = dict(per_device_train_batch_size=16, per_device_eval_batch_size=20, gradient_checkpointing=False,
                  report_to="none", save_strategy="no", logging_steps=10, seed=0, lr_scheduler_type="cosine",
                  warmup_steps=0.05)
    return {
        "pretrain": (
            PretrainArguments(train_file=[str(output_dir / "data" / "pretraining_text.txt")], vocab_size=2048,
                              preset="small",
                              config_overrides="hidden_size=256,num_hidden_layers=4,num_attention_heads=4",
                              validation_split_percentage=5, overwrite_output_dir=True, num_samples=0),
            PretrainingArguments(output_dir=str(output_dir / "pretrain"), num_train_epochs=48.0, max_steps=-1,
                                 per_device_train_batch_size=16, learning_rate=2e-3, report_to="none",
                                 save_strategy="no", eval_strategy="no", logging_steps=20, seed=0, disable_tqdm=False)),
        "sft": HFGPTSFTConfig(str(output_dir / "sft"), num_train_epochs=3.0, learning_rate=1e-3, **common),
        "dpo": HFGPTDPOConfig(str(output_dir / "dpo"), num_train_epochs=2.0, learning_rate=2e-4, beta=0.1,
                              loss_type=["hinge", "sft"], **common),
    }


def _old_split(rows):  # the old bench's split(): the last 10% held out
    cut = len(rows) - int(len(rows) * 0.10)
    return rows[:cut], rows[cut:]


def _as_dict(arguments) -> dict:
    return arguments.to_dict() if hasattr(arguments, "to_dict") else dataclasses.asdict(arguments)


def _differences(new, old) -> set[str]:
    new, old = _as_dict(new), _as_dict(old)
    return {key for key in new.keys() | old.keys() if new.get(key) != old.get(key)}


@needs_shared_data
def test_chat_recipe_resolves_to_the_arguments_the_alignment_bench_used(tmp_path, monkeypatch):
    from hfgpt.recipes import make_data

    monkeypatch.chdir(REPO)
    output_dir = tmp_path / "chat"
    plan = plan_recipe("recipes/chat.yaml", [f"output_dir={output_dir}"])
    stages = {stage.name: stage for stage in plan.stages}
    parsed = {name: stages[name].invocations[0].command.parser().parse_args_into_dataclasses(
        args=stages[name].invocations[0].argv) for name in ("pretrain", "sft", "dpo")}
    old = _old_bench_arguments(output_dir)

    pretrain_args, pretrain_training = parsed["pretrain"]
    assert _differences(pretrain_args, old["pretrain"][0]) == RUNNER_OWNED
    assert _differences(pretrain_training, old["pretrain"][1]) == {"save_strategy"}
    for name in ("sft", "dpo"):
        script_args, peft_args, config = parsed[name]
        assert _differences(config, old[name]) <= CHECKPOINTING, name
        assert not peft_args.lora and (script_args.max_new_tokens, script_args.generation_batch_size) == (64, 20)
        assert script_args.max_eval_prompts is None  # all 100 held-out prompts, as the bench answered
    assert parsed["dpo"][0].eval_prompts_file.endswith("instructions_held_out.jsonl")
    rouge_before = stages["eval"].invocations[0].fields
    assert (rouge_before["model_name_or_path"], rouge_before["max_new_tokens"], rouge_before["batch_size"]) == (
        str(output_dir / "pretrain"), 64, 20)

    # the data: the same rows the bench split off in memory, and the same pretraining text it wrote
    made = {data.name: files.read_rows(make_data(data)) if data.path.suffix == ".jsonl" else make_data(data)
            for data in plan.data}
    instructions = files.read_rows(SHARED_DATA / "instructions.jsonl")
    preferences = files.read_rows(SHARED_DATA / "preferences.jsonl")
    assert (made["instructions_train"], made["instructions_held_out"]) == _old_split(instructions)
    assert (made["preferences_train"], made["preferences_held_out"]) == _old_split(preferences)
    documents = ["\n".join(part for part in (row["instruction"], row.get("input"), row["output"]) if part)
                 for row in _old_split(instructions)[0]]
    assert made["pretraining_text"].read_text() == "\n\n".join(documents) + "\n"

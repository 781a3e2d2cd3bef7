"""hfgpt pretrain: optimizer groups, loss scaling, resume after kill -9, 2-process DDP, the quickstart, bad input."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainingArguments
from transformers.trainer_callback import TrainerControl, TrainerState

from hfgpt import HFGPTConfig, HFGPTForCausalLM, files
from hfgpt.training.common import (
    NonFiniteTrainingError,
    StopOnNonFiniteWeights,
    checkpoint_dirs,
    decay_parameter_names,
    resolve_resume_checkpoint,
)
from hfgpt.training.pretrain import main, parse_args, prepare_pretraining, run_pretraining, train_and_save

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, tiny_corpus):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(tiny_corpus), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def tiny_run_args(output_dir, corpus_file, tokenizer_dir, *extra):
    """A few-second run of the `tiny` preset; `extra` overrides."""
    return ["--output_dir", str(output_dir), "--train_file", corpus_file, "--tokenizer_name_or_path", tokenizer_dir,
            "--preset", "tiny", "--block_size", "32", "--sample_by", "line", "--per_device_train_batch_size", "4",
            "--max_steps", "6", "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
            "--report_to", "none", "--num_samples", "0", "--disable_tqdm", "true", "--seed", "7",
            "--dataloader_num_workers", "0", *extra]


def logged(output_dir, key="loss"):
    history = json.loads((Path(output_dir) / files.LOG_HISTORY_JSON).read_text())
    return [entry[key] for entry in history if key in entry]


# --------------------------------------------------------------------------------------------------------------------
# Optimizer


@pytest.mark.parametrize("preset", ["tiny", "modern-tiny"])
def test_weight_decay_only_on_matrices(preset, tmp_path, corpus_file, tokenizer_dir):
    model = HFGPTForCausalLM(HFGPTConfig.from_preset(preset, position_embedding_type="learned"))
    decayed = set(decay_parameter_names(model))
    expected = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                and name != "lm_head"}  # lm_head is tied to the token embedding
    assert decayed == {f"{name}.weight" for name in expected}
    assert not any(part in name for name in decayed for part in ("wte", "wpe", "ln_", "bias", "norm"))

    # and the Trainer's optimizer is built from exactly these groups
    args = parse_args(tiny_run_args(tmp_path, corpus_file, tokenizer_dir, "--preset", preset,
                                    "--config_overrides", "position_embedding_type=learned", "--weight_decay", "0.1"))
    trainer = prepare_pretraining(*args).trainer
    optimizer = trainer.create_optimizer()
    names = {id(parameter): name for name, parameter in trainer.model.named_parameters()}
    groups = {group["weight_decay"]: {names[id(p)] for p in group["params"]} for group in optimizer.param_groups}
    assert groups[0.1] == {name for name in decayed if name in names.values()}
    assert groups[0.0] == set(names.values()) - groups[0.1]
    assert "transformer.wte.weight" in groups[0.0] and "transformer.wpe.weight" in groups[0.0]


@pytest.mark.parametrize("overrides", [[], ["--config_overrides", "num_experts=4,num_experts_per_tok=2"]],
                         ids=["dense", "mixture-of-experts"])
def test_gradient_accumulation_matches_the_large_batch(tmp_path, corpus_file, tokenizer_dir, overrides):
    """batch 4 = 2 x 2 accumulated: the same losses and gradient norms (the model forwards num_items_in_batch to
    the loss; dropping it would double the accumulated gradient). In fp32: bf16 rounds batches of 2 and of 4
    differently, by more than this comparison allows. With a mixture of experts the logged loss carries the
    load-balancing loss (0.01 x ~1): counted once per step, not once per micro-batch, or the losses differ by ~0.01.
    (Its value over two halves is not exactly its value over the whole batch, but the difference is far below 1e-4.)"""
    run_pretraining(*parse_args(tiny_run_args(tmp_path / "big", corpus_file, tokenizer_dir, "--max_steps", "3",
                                              "--bf16", "false", *overrides)))
    run_pretraining(*parse_args(tiny_run_args(tmp_path / "acc", corpus_file, tokenizer_dir, "--max_steps", "3",
                                              "--bf16", "false", *overrides, "--per_device_train_batch_size", "2",
                                              "--gradient_accumulation_steps", "2")))
    for key in ("loss", "grad_norm"):
        assert logged(tmp_path / "acc", key) == pytest.approx(logged(tmp_path / "big", key), rel=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# Resume


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from hfgpt.training.pretrain import parse_args, prepare_pretraining, train_and_save

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(sys.argv[1]):
                os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no flush: like the OOM killer

    train_and_save(prepare_pretraining(*parse_args(sys.argv[2:]), callbacks=[KillAt()]))
""")


def test_resume_after_kill_9_ends_like_an_uninterrupted_run(tmp_path, corpus_file, tokenizer_dir):
    common = ["--max_steps", "10", "--save_strategy", "steps", "--save_steps", "4", "--eval_strategy", "steps",
              "--eval_steps", "5", "--validation_split_percentage", "10"]
    killed_dir = tmp_path / "killed"
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    process = subprocess.run([sys.executable, str(script), "7", *tiny_run_args(killed_dir, corpus_file, tokenizer_dir,
                                                                               *common)],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
    assert [path.name for path in checkpoint_dirs(killed_dir)] == ["checkpoint-4"]
    assert not (killed_dir / "model.safetensors").exists()

    # a crash while writing the next checkpoint leaves a directory without trainer_state.json; resume skips it
    partial = killed_dir / "checkpoint-6"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes((killed_dir / "checkpoint-4" / "model.safetensors").read_bytes()[:100])
    assert resolve_resume_checkpoint("true", killed_dir) == str(killed_dir / "checkpoint-4")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume_checkpoint(str(partial), killed_dir)

    resumed = run_pretraining(*parse_args(tiny_run_args(killed_dir, corpus_file, tokenizer_dir, *common,
                                                        "--resume_from_checkpoint", "true")))
    straight = run_pretraining(*parse_args(tiny_run_args(tmp_path / "straight", corpus_file, tokenizer_dir, *common)))
    assert resumed["global_step"] == straight["global_step"] == 10
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-5)
    assert logged(killed_dir)[-1] == pytest.approx(logged(tmp_path / "straight")[-1], rel=1e-5)
    from safetensors.torch import load_file

    a, b = (load_file(path / "model.safetensors") for path in (killed_dir, tmp_path / "straight"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


INTERRUPTED_RUN = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    import hfgpt.training.pretrain as pretrain

    class CtrlCAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(sys.argv[1]):
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C in the terminal sends

    callbacks = pretrain.training_callbacks
    pretrain.training_callbacks = lambda *args, **kwargs: [*callbacks(*args, **kwargs), CtrlCAt()]
    sys.exit(pretrain.main(sys.argv[2:]))
""")


def test_ctrl_c_stops_cleanly_and_names_the_checkpoint_and_the_resume_command(tmp_path, corpus_file, tokenizer_dir,
                                                                               capsys, monkeypatch):
    import shlex

    import transformers.trainer

    out = tmp_path / "run"
    arguments = tiny_run_args(out, corpus_file, tokenizer_dir, "--max_steps", "8", "--save_strategy", "steps",
                              "--save_steps", "4", "--overwrite_output_dir")
    script = tmp_path / "interrupted_run.py"
    script.write_text(INTERRUPTED_RUN)
    process = subprocess.run([sys.executable, str(script), "6", *arguments], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.returncode == 130, process.stderr[-3000:]
    assert "Traceback" not in process.stderr and "KeyboardInterrupt" not in process.stderr
    message = process.stderr.strip().splitlines()
    assert message[-2] == f"hfgpt pretrain: interrupted. The last complete checkpoint is {out / 'checkpoint-4'} " \
                          "(step 4); to continue from it, run"
    command = shlex.split(message[-1])
    assert command[:2] == ["hfgpt", "pretrain"] and command[-2:] == ["--resume_from_checkpoint", "true"]
    assert "--overwrite_output_dir" not in command and command[2:-2] == arguments[:-1]

    warnings = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda message, *a, **k: warnings.append(message))
    capsys.readouterr()
    assert main(command[2:]) == 0  # the printed command, as printed
    assert f"Resuming from {out / 'checkpoint-4'} (step 4)." in capsys.readouterr().out
    assert not [w for w in warnings if "missing keys" in str(w)]  # the tied lm_head is no missing key
    assert logged(out, "step")[-1] == 8


# --------------------------------------------------------------------------------------------------------------------
# Divergence


def test_a_diverged_run_stops_with_a_clear_error_and_saves_nothing(tmp_path, corpus_file, tokenizer_dir,
                                                                   poison_weights_at):
    output_dir = tmp_path / "diverged"
    arguments = tiny_run_args(output_dir, corpus_file, tokenizer_dir, "--max_steps", "20")
    run = prepare_pretraining(*parse_args(arguments), callbacks=[poison_weights_at(3)])
    with pytest.raises(NonFiniteTrainingError, match=r"diverged by step 4: the model's weights hold NaN.*learning_rate"):
        train_and_save(run)
    assert run.trainer.state.global_step == 4  # stopped at the first log after the damage, not after 20 steps
    assert not (output_dir / "model.safetensors").exists()


def test_finite_weights_with_an_inf_gradient_norm_go_on(tiny_model, tmp_path):
    """fp16's loss scaler skips a step whose gradients overflow: the norm is inf, the weights are fine."""
    callback, args = StopOnNonFiniteWeights(), TrainingArguments(str(tmp_path), report_to="none")
    state, control = TrainerState(global_step=5), TrainerControl()
    callback.on_log(args, state, control, logs={"loss": 2.0, "grad_norm": float("inf")}, model=tiny_model)
    with torch.no_grad():
        tiny_model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteTrainingError, match="No checkpoint was saved"):
        callback.on_log(args, state, control, logs={"loss": 2.0, "grad_norm": float("inf")}, model=tiny_model)
    # the filtered loss can look finite; without a gradient norm to go by (not logged), the weights are looked at
    with pytest.raises(NonFiniteTrainingError):
        callback.on_log(args, state, control, logs={"loss": 2.0}, model=tiny_model)
    callback.on_log(args, state, control, logs={"loss": 2.0, "grad_norm": 1.0}, model=tiny_model)  # not looked at


# --------------------------------------------------------------------------------------------------------------------
# Two processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ddp_processes_follow_the_single_process_loss_trajectory(tmp_path, corpus_file, tokenizer_dir):
    """`accelerate launch` with train/accelerate/ddp.yaml, 2 CPU processes x 2 blocks = 1 process x 4 blocks."""
    steps = ["--max_steps", "4", "--use_cpu", "true"]  # CPU processes over gloo, GPUs or not
    run_pretraining(*parse_args(tiny_run_args(tmp_path / "one", corpus_file, tokenizer_dir, *steps)))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "train" / "accelerate" / "ddp.yaml"), "--num_processes", "2", "--main_process_port",
               str(free_port()), str(REPO / "train" / "pretrain.py"),
               *tiny_run_args(tmp_path / "two", corpus_file, tokenizer_dir, *steps,
                              "--per_device_train_batch_size", "2")]
    process = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.returncode == 0, process.stderr[-4000:]
    summary = json.loads((tmp_path / "two" / files.TRAINING_SUMMARY).read_text())
    assert summary["hyperparameters"]["world_size"] == 2 and summary["hyperparameters"]["global_batch_size"] == 4
    assert summary["hyperparameters"]["distributed_type"] == "MULTI_CPU"  # DDP (the FSDP run: tests/test_fsdp.py)
    assert logged(tmp_path / "two") == pytest.approx(logged(tmp_path / "one"), rel=1e-4)


def test_accelerate_configs_parse_and_wrap_the_decoder_block():
    import hfgpt.modeling_hfgpt as modeling

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    paths = sorted((REPO / "train" / "accelerate").glob("*.yaml"))
    assert {path.name for path in paths} == {"ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml",
                                            "multinode.yaml"}
    launch_options = {action.dest for action in launch_command_parser()._actions}
    configs = {}
    for path in paths:
        load_config_from_file(str(path))  # accelerate's own loader: unknown top-level keys raise
        configs[path.name] = config = yaml.safe_load(path.read_text())
        for key in config.get("fsdp_config", {}) | config.get("deepspeed_config", {}):
            assert key in launch_options, f"{path.name}: accelerate launch has no option {key}"
    wrapped = configs["fsdp.yaml"]["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    assert isinstance(getattr(modeling, wrapped), type)
    assert configs["deepspeed_zero2.yaml"]["deepspeed_config"]["zero_stage"] == 2
    assert configs["deepspeed_zero3.yaml"]["deepspeed_config"]["zero_stage"] == 3
    assert configs["multinode.yaml"]["num_machines"] > 1


# --------------------------------------------------------------------------------------------------------------------
# The quickstart and the model directory


def test_quickstart_on_a_tiny_budget(tmp_path, capsys):
    """`hfgpt pretrain` with no data: trains a tokenizer and a model on Python's docstrings, prints samples and the
    validation perplexity, and leaves a directory that AutoModelForCausalLM loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir = tmp_path / "quickstart"
    code = main(["--output_dir", str(output_dir), "--default_corpus_max_chars", "60000", "--max_steps", "4",
                 "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", "--vocab_size", "600",
                 "--disable_tqdm", "true", "--sample_max_new_tokens", "8", "--eval_steps", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Sample generations" in printed and "perplexity" in printed
    saved = {path.name for path in output_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "modeling_hfgpt.py",
            "configuration_hfgpt.py", "tokenizer.json", files.TRAINING_SUMMARY, files.LOG_HISTORY_JSON,
            files.LOG_HISTORY_CSV, files.LOSS_CURVE, files.MODEL_CARD, "runs"} <= saved
    assert not list(output_dir.glob("*.bin")) and not list(output_dir.glob("*.pt*"))  # no pickle in the model
    summary = json.loads((output_dir / files.TRAINING_SUMMARY).read_text())
    final = summary["final_metrics"]
    assert final["eval_perplexity"] == pytest.approx(float(torch.tensor(final["eval_loss"]).exp()), rel=1e-5)
    assert summary["dataset"].startswith("docstrings of the Python")
    assert logged(output_dir, "eval_perplexity")  # logged at every evaluation, not only at the end

    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert model.config.vocab_size == len(tokenizer) and model.generation_config.eos_token_id == tokenizer.eos_token_id
    out = model.generate(torch.tensor([[tokenizer.eos_token_id]]), max_new_tokens=5, do_sample=False)
    assert out.shape[1] >= 2


# --------------------------------------------------------------------------------------------------------------------
# Bad input


def test_output_dir_holding_a_different_model(tmp_path, corpus_file, tokenizer_dir, capsys):
    output_dir = tmp_path / "out"
    HFGPTForCausalLM(HFGPTConfig.from_preset("tiny", hidden_size=32)).save_pretrained(output_dir)
    code = main(tiny_run_args(output_dir, corpus_file, tokenizer_dir))
    error = capsys.readouterr().err
    assert code == 1 and "holds a different model" in error and "hidden_size: 32 there, 64 now" in error
    assert "--overwrite_output_dir" in error


def test_output_dir_with_an_earlier_run_needs_resume_or_overwrite(tmp_path, corpus_file, tokenizer_dir, capsys):
    args = tiny_run_args(tmp_path / "out", corpus_file, tokenizer_dir, "--max_steps", "2")
    assert main(args) == 0
    assert main(args) == 1 and "--resume_from_checkpoint" in capsys.readouterr().err
    assert main([*args, "--overwrite_output_dir", "true"]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--block_size", "256"], "block_size=256 is larger than the model's max_position_embeddings=128"),
    (["--text_column", "body"], "no column 'body'; its columns are 'text'"),
    (["--config_overrides", "hiden_size=8"], "unknown config field(s) hiden_size"),
    (["--resume_from_checkpoint", "true"], "no complete checkpoint"),
])
def test_clear_errors(tmp_path, corpus_file, tokenizer_dir, capsys, extra, message):
    assert main(tiny_run_args(tmp_path / "out", corpus_file, tokenizer_dir, *extra)) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--config_overrides", "hiden_size=8"], "unknown config field(s) hiden_size"),
    (["--config_overrides", "norm_type=batchnorm"], "norm_type='batchnorm' is not supported"),
    (["--block_size", "256"], "block_size=256 is larger than the model's max_position_embeddings=128"),
    (["--output_dir", "{occupied}"], "already holds a trained model from an earlier run"),
])
def test_bad_arguments_are_checked_before_any_data_or_tokenizer_work(tmp_path, corpus_file, capsys, monkeypatch,
                                                                     extra, message):
    import hfgpt.training.pretrain as pretrain

    def too_late(*args, **kwargs):
        raise AssertionError("data were read (and a tokenizer would be trained) before the arguments were checked")

    occupied = tmp_path / "occupied"
    HFGPTForCausalLM(HFGPTConfig.from_preset("tiny")).save_pretrained(occupied)
    monkeypatch.setattr(pretrain, "load_training_rows", too_late)
    monkeypatch.setattr(pretrain, "load_or_train_tokenizer", too_late)
    args = ["--output_dir", str(tmp_path / "out"), "--train_file", corpus_file, "--vocab_size", "300",
            "--preset", "tiny", "--report_to", "none", *(arg.format(occupied=occupied) for arg in extra)]
    assert main(args) == 1
    assert message in capsys.readouterr().err
    # the older spelling of the RoPE base is still an override
    assert pretrain.build_config("tiny", {"position_embedding_type": "rope", "rope_theta": 500}, None).rope_theta == 500


def test_empty_corpus(tmp_path, tokenizer_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n\n")
    assert main(tiny_run_args(tmp_path / "out", str(empty), tokenizer_dir)) == 1
    assert "empty" in capsys.readouterr().err

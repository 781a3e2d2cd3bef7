"""FSDP2 that has run: `accelerate launch --config_file train/accelerate/fsdp.yaml --num_processes 2` on CPU processes
(gloo), the `tiny` preset. The sharded run follows the single-process loss trajectory, writes sharded checkpoints one
file per rank, resumes after a kill to where an uninterrupted run ends, and leaves one safetensors file that loads in a
single process with the sharded model's logits.

Runs are fp32 and eager (--bf16 false --torch_compile false) so that the two trajectories may be compared closely."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hfgpt import HFGPTConfig, HFGPTForCausalLM, files
from hfgpt.training.common import checkpoint_dirs
from hfgpt.training.pretrain import parse_args, run_pretraining
from test_alignment import instruction_rows, write_jsonl
from test_pretrain import corpus_file, free_port, logged, tiny_run_args, tokenizer_dir  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 240  # seconds; a run takes ~10 s. Past it the launcher's whole process group is killed.
PROBE_IDS = [[5, 17, 42, 99, 3, 250, 7, 64, 128, 1, 33, 300]]  # token ids the logits are compared on

# Every run: 8 steps, a sharded checkpoint every 4, a global batch of 4 blocks (2 processes x 2, or 1 x 4). A process
# that waits for a dead peer gives up after --ddp_timeout seconds instead of CI's 600 s test timeout.
STEPS = ["--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4", "--bf16", "false",
         "--torch_compile", "false", "--use_cpu", "true", "--ddp_timeout", "120"]

# The launched script: pretraining as `train/pretrain.py` runs it, optionally SIGKILLed on the main process after
# step `kill_at`; at the end each process reports its parameters' local shards, and the sharded model's logits on
# PROBE_IDS are written (computed by both processes together, as any forward of a sharded model is).
SHARDED_RUN = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from torch.distributed.tensor import DTensor
    from transformers import TrainerCallback
    from safetensors.torch import save_file
    from hfgpt.training.common import end_distributed
    from hfgpt.training.pretrain import parse_args, prepare_pretraining, train_and_save

    kill_at, report_dir, probe = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill_at and args.process_index == 0:
                os.kill(os.getpid(), signal.SIGKILL)  # no clean-up: like the OOM killer

    run = prepare_pretraining(*parse_args(sys.argv[4:]), callbacks=[KillAt()])
    train_and_save(run)
    model, rank = run.trainer.model, run.training_args.process_index
    shards = {name: [type(p).__name__, p.to_local().numel() if isinstance(p, DTensor) else p.numel(), p.numel()]
              for name, p in model.named_parameters()}
    with open(os.path.join(report_dir, f"shards_rank{rank}.json"), "w") as handle:
        json.dump({"class": type(model).__name__, "parameters": shards}, handle)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(probe)).logits
    if rank == 0:
        save_file({"logits": logits.contiguous()}, os.path.join(report_dir, "sharded_logits.safetensors"))
    end_distributed()
""")


def launch_two_processes(cwd, *script_and_arguments) -> tuple[int, str]:
    """`accelerate launch` with train/accelerate/fsdp.yaml on 2 CPU processes; (exit code, output). The launcher
    starts a session of its own, killed whole if it outlives LAUNCH_TIMEOUT, so no rank is left waiting on a dead
    peer."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "train" / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
               "--main_process_port", str(free_port()), *map(str, script_and_arguments)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the 2-process run outlived {LAUNCH_TIMEOUT} s:\n{output[-4000:]}")
    return process.returncode, output


def launch_sharded(tmp_path, output_dir, corpus_file, tokenizer_dir, *extra, kill_at=0):  # noqa: F811
    """Sharded pretraining (SHARDED_RUN); (exit code, output, the directory of the processes' reports)."""
    report_dir = Path(output_dir).parent / f"{Path(output_dir).name}-report"
    report_dir.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "sharded_run.py"
    script.write_text(SHARDED_RUN)
    code, output = launch_two_processes(
        tmp_path, script, kill_at, report_dir, json.dumps(PROBE_IDS),
        *tiny_run_args(output_dir, corpus_file, tokenizer_dir, *STEPS, "--per_device_train_batch_size", "2", *extra))
    return code, output, report_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_file, tokenizer_dir):  # noqa: F811
    """The single-process reference and the uninterrupted sharded run (same seed, data and global batch)."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    single = tmp_path / "single"
    run_pretraining(*parse_args(tiny_run_args(single, corpus_file, tokenizer_dir, *STEPS)))
    sharded = tmp_path / "sharded"
    # with sample generations, which every process takes part in (each forward gathers the sharded weights)
    code, output, report = launch_sharded(tmp_path, sharded, corpus_file, tokenizer_dir, "--num_samples", "2",
                                          "--sample_max_new_tokens", "4")
    assert code == 0, output[-4000:]
    return {"tmp": tmp_path, "single": single, "sharded": sharded, "report": report, "output": output}


def test_every_parameter_is_sharded_and_no_fallback_warning(runs):
    reports = [json.loads((runs["report"] / f"shards_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert {report["class"] for report in reports} == {"FSDPHFGPTForCausalLM"}
    for name, (kind, local, total) in reports[0]["parameters"].items():
        other_kind, other_local, _ = reports[1]["parameters"][name]
        assert kind == other_kind == "DTensor", name
        assert local + other_local == total and max(local, other_local) < total, (name, local, other_local, total)
    assert "not active on this machine" not in runs["output"]  # the DDP fallback warning
    assert runs["output"].count("Sample generations") == 1  # generated by both processes, printed by one
    summary = json.loads((runs["sharded"] / files.TRAINING_SUMMARY).read_text())
    assert summary["hyperparameters"]["distributed_type"] == "FSDP"


def test_sharded_loss_trajectory_equals_the_single_process(runs):
    """Same fp32 arithmetic in another order: each process's gradient is the mean over its 2 blocks and the
    reduce-scatter averages the two, where one process averages 4 blocks at once. Measured on the development machine:
    losses differ by 8e-8 relative, gradient norms by 2.4e-7, final weights by 2.6e-6 at most (values up to 1.0), the
    rounding of the reordering carried through 8 AdamW steps. The tolerances leave ~100x room for other BLAS builds,
    while a real fault (a wrong batch split, a gradient not reduced, a step skipped) moves the loss by > 1e-3."""
    single, sharded = logged(runs["single"]), logged(runs["sharded"])
    assert len(sharded) == len(single) == 8
    assert sharded == pytest.approx(single, rel=1e-5)
    assert logged(runs["sharded"], "grad_norm") == pytest.approx(logged(runs["single"], "grad_norm"), rel=1e-5)
    single_weights = load_file(runs["single"] / "model.safetensors")
    for name, tensor in load_file(runs["sharded"] / "model.safetensors").items():
        torch.testing.assert_close(tensor, single_weights[name], rtol=1e-4, atol=1e-4)


def test_sharded_checkpoints_are_one_file_per_rank(runs):
    for checkpoint in checkpoint_dirs(runs["sharded"]):
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # torch.distributed.checkpoint directories
            assert sorted(path.name for path in (checkpoint / part).glob("*.distcp")) == ["__0_0.distcp",
                                                                                           "__1_0.distcp"]
            assert (checkpoint / part / ".metadata").is_file()
        assert not list(checkpoint.glob("*.safetensors"))  # no gathered copy in a checkpoint
        assert (checkpoint / "config.json").is_file() and (checkpoint / "tokenizer.json").is_file()


def test_the_final_model_is_one_safetensors_file_with_the_sharded_logits(runs):
    sharded = runs["sharded"]
    assert [path.name for path in sharded.glob("*.safetensors*")] == ["model.safetensors"]
    assert not list(sharded.glob("_fsdp*.py"))  # torch's FSDP sources are not model code
    config = json.loads((sharded / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hfgpt.HFGPTForCausalLM"
    weights = load_file(sharded / "model.safetensors")
    assert "lm_head.weight" not in weights  # tied to the embedding, stored once
    assert weights.keys() == load_file(runs["single"] / "model.safetensors").keys()

    model, info = HFGPTForCausalLM.from_pretrained(sharded, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        logits = model.eval()(torch.tensor(PROBE_IDS)).logits
    torch.testing.assert_close(logits, load_file(runs["report"] / "sharded_logits.safetensors")["logits"],
                               rtol=1e-5, atol=1e-5)


def test_killed_sharded_run_resumes_to_where_the_uninterrupted_run_ends(runs, corpus_file, tokenizer_dir):  # noqa: F811
    killed = runs["tmp"] / "killed"
    code, output, _ = launch_sharded(runs["tmp"], killed, corpus_file, tokenizer_dir, kill_at=6)
    assert code != 0 and "SIGKILL" in output, output[-4000:]
    assert [path.name for path in checkpoint_dirs(killed)] == ["checkpoint-4"]
    assert not (killed / "model.safetensors").exists()

    code, output, _ = launch_sharded(runs["tmp"], killed, corpus_file, tokenizer_dir, "--resume_from_checkpoint",
                                     "true")
    assert code == 0, output[-4000:]
    assert "Resuming from" in output and "checkpoint-4" in output
    assert logged(killed) == pytest.approx(logged(runs["sharded"]), rel=1e-6)  # the same processes, the same order
    resumed, straight = (load_file(path / "model.safetensors") for path in (killed, runs["sharded"]))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-6, atol=1e-7)


def test_sharded_sft_follows_the_single_process(runs, tmp_path):
    """SFT (TRL's SFTTrainer, assistant-only loss) from the sharded pretrained model: `train/sft.py` under the same
    FSDP config gives the single process's losses (tolerance as for pretraining) and a model that loads alone."""
    data = write_jsonl(tmp_path / "instructions.jsonl", instruction_rows(20))
    common = ["--model_name_or_path", str(runs["sharded"]), "--train_file", data, "--max_steps", "3", "--logging_steps",
              "1", "--learning_rate", "1e-3", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
              "--validation_split_percentage", "10", "--max_eval_prompts", "0", "--bf16", "false", "--use_cpu", "true",
              "--ddp_timeout", "120", "--seed", "3"]
    from hfgpt.training.alignment import sft_main

    assert sft_main([*common, "--output_dir", str(tmp_path / "single"), "--per_device_train_batch_size", "4"]) == 0
    code, output = launch_two_processes(tmp_path, REPO / "train" / "sft.py", *common, "--output_dir",
                                        tmp_path / "sharded", "--per_device_train_batch_size", "2")
    assert code == 0, output[-4000:]
    assert "not active on this machine" not in output
    summary = json.loads((tmp_path / "sharded" / files.TRAINING_SUMMARY).read_text())
    assert summary["training_arguments"]["distributed_type"] == "FSDP"
    assert summary["training_arguments"]["global_batch_size"] == 4
    assert logged(tmp_path / "sharded") == pytest.approx(logged(tmp_path / "single"), rel=1e-5)
    assert len(logged(tmp_path / "sharded")) == 3
    assert [path.name for path in (tmp_path / "sharded").glob("*.safetensors")] == ["model.safetensors"]
    HFGPTForCausalLM.from_pretrained(tmp_path / "sharded")


def test_memory_bench_each_process_holds_half_of_the_state(tmp_path, corpus_file):  # noqa: F811
    """bench/fsdp_memory.py end to end at the tiny shape (its numbers are for the gpt2 shape, docs/distributed.md):
    the two FSDP2 processes together hold what each DDP process holds, parameters, gradients and AdamW state."""
    command = [sys.executable, str(REPO / "bench" / "fsdp_memory.py"), "--preset", "tiny", "--train_file",
               corpus_file, "--block_size", "32", "--max_steps", "2", "--tokenizer_vocab_size", "300",
               "--port", str(free_port())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=2 * LAUNCH_TIMEOUT, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    reports = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines()
               if line.startswith(("DDP [", "FSDP2 ["))}
    assert [report["distributed_type"] for report in reports["FSDP2"]] == ["FSDP", "FSDP"]
    assert [report["distributed_type"] for report in reports["DDP"]] == ["MULTI_CPU", "MULTI_CPU"]
    for key in ("parameters", "gradients", "optimizer"):
        ddp = reports["DDP"][0][key]
        assert reports["DDP"][1][key] == ddp > 0
        # AdamW's `step` counters are whole (not sharded) tensors on every process: 4 bytes per parameter tensor
        extra = 4 * len(list(HFGPTForCausalLM(HFGPTConfig.from_preset("tiny")).parameters())) if key == "optimizer" \
            else 0
        assert sum(report[key] for report in reports["FSDP2"]) == ddp + extra, key
    assert "FSDP2 / DDP per process: parameters + gradients + optimizer 0.50x" in done.stdout


def test_a_mixture_of_experts_shards_by_block_and_follows_the_single_process(tmp_path, corpus_file,  # noqa: F811
                                                                           tokenizer_dir):  # noqa: F811
    """The wrap unit stays the block with experts inside it (issue #30). Without the balance loss (coefficient 0) the
    loss is the same token mean however the batch is split, so the trajectories must agree as the dense ones do; the
    balance loss itself is a product of per-batch means, which a split changes by design."""
    moe = ["--config_overrides", "num_experts=4,num_experts_per_tok=2,router_aux_loss_coef=0"]
    single = tmp_path / "moe-single"
    run_pretraining(*parse_args(tiny_run_args(single, corpus_file, tokenizer_dir, *STEPS, *moe)))
    code, output, report = launch_sharded(tmp_path, tmp_path / "moe-sharded", corpus_file, tokenizer_dir, *moe)
    assert code == 0, output[-4000:]
    parameters = json.loads((report / "shards_rank0.json").read_text())["parameters"]
    experts = [name for name in parameters if ".experts." in name]
    assert experts and all(parameters[name][0] == "DTensor" for name in parameters)
    assert logged(tmp_path / "moe-sharded") == pytest.approx(logged(single), rel=1e-5)
    model = HFGPTForCausalLM.from_pretrained(tmp_path / "moe-sharded")
    assert model.config.num_experts == 4


# FSDP2 forwards, then the end of a script. Rank 0 lingers so that rank 1 waits in the final barrier, the timing under
# which gloo's threads used to abort the exiting process (a 1-in-10 SIGABRT before end_distributed exited hard).
END_OF_RUN = textwrap.dedent("""
    import time, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from hfgpt.training.common import end_distributed

    dist.init_process_group("gloo")
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(3)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    with torch.no_grad():
        model(torch.randn(2, 16))
    if dist.get_rank() == 0:
        time.sleep(0.3)
    print(f"rank {dist.get_rank()} saved", flush=True)
    end_distributed()
    print("returned from end_distributed", flush=True)
""")


def test_end_distributed_ends_every_process_cleanly_after_the_barrier(tmp_path):
    """What a script's last line does in a multi-process run: every rank passes the barrier, prints what it printed,
    and ends with exit code 0 without returning into interpreter shutdown (where gloo's threads can abort it)."""
    script = tmp_path / "end_of_run.py"
    script.write_text(END_OF_RUN)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script)], capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "rank 0 saved" in output and "rank 1 saved" in output
    assert "returned from end_distributed" not in output and "terminate called" not in output

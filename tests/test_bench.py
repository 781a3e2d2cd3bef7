"""The benchmark scripts run end to end, as a user runs them, on tiny data made here (the real runs read
../shared/data and take minutes to hours). The numbers are meaningless at this size: these tests check that every
stage runs and that the tables and result files hold what the README says they do."""

import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hfgpt.hardware import compiler_available
from hfgpt.onednn import onednn_supported

REPO = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat with some red blue green apples and pears near the river hill town".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


# Only a hang should hit this: each run takes a minute or two on a quiet 2-core machine, several times that on a busy
# one (a full suite with other jobs beside it timed out at 300 s), and no assertion below depends on speed.
BENCH_TIMEOUT = 3600


def run_bench(script: str, *args: str, timeout: int = BENCH_TIMEOUT, **env_overrides: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **env_overrides)
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_alignment_development_fold_never_reads_the_held_out_rows():
    from hfgpt.recipes import select_rows

    row_specs = load_bench("alignment").row_specs
    rows = [{"row": i} for i in range(1000)]
    train, held = (select_rows(rows, spec) for spec in row_specs(len(rows)))
    assert [r["row"] for r in held] == list(range(900, 1000)) and len(train) == 900
    train, dev = (select_rows(rows, spec) for spec in row_specs(len(rows), dev_fold=700))
    assert [r["row"] for r in dev] == list(range(700, 800))
    assert [r["row"] for r in train] == list(range(700)) + list(range(800, 900))
    with pytest.raises(ValueError, match="must start between 0 and 800"):
        row_specs(len(rows), dev_fold=850)


def test_alignment_bench_quick(tmp_path):
    rng = random.Random(0)
    with open(tmp_path / "instructions.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"instruction": sentence(rng, 6), "input": sentence(rng, 3) if i % 3 == 0 else "",
                                "output": sentence(rng, 30)}) + "\n")
    with open(tmp_path / "preferences.jsonl", "w") as f:
        for _ in range(40):
            answer = sentence(rng, 8)
            f.write(json.dumps({"instruction": sentence(rng, 6), "input": "", "chosen": answer,
                                "rejected": answer + " Duh, obviously."}) + "\n")
    out = run_bench("alignment.py", "--quick", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "run"),
                    "--config_overrides", "hidden_size=64,num_hidden_layers=2,num_attention_heads=2,"
                                          "position_embedding_type=rope")
    for stage in ("before SFT", "after SFT", "after DPO"):
        row = next(line for line in out.splitlines() if line.startswith(stage)).split()
        assert all(0.0 <= float(value) <= 1.0 for value in row[-3:]), row
    assert "held-out reward accuracy" in out
    pairs = [json.loads(line) for line in open(tmp_path / "run" / "dpo" / "preference_pairs.jsonl")]
    assert len(pairs) == 4  # the last 10% of 40 pairs
    for stage in ("pretrain", "sft", "dpo"):  # recipes/chat.yaml's stages
        assert (tmp_path / "run" / stage / "model.safetensors").exists()
        config = json.loads((tmp_path / "run" / stage / "config.json").read_text())
        assert (config["hidden_size"], config["position_embedding_type"]) == (64, "rope")  # --config_overrides


def spam_file(path):
    rng = random.Random(0)
    with open(path, "w") as f:
        f.write("label\ttext\n")
        for i in range(500):
            f.write(f"spam\tWIN a FREE prize now call 0800 {sentence(rng, 12)}\n" if i % 5 == 0
                    else f"ham\t{sentence(rng, 16)}\n")
    return path


TINY_SPAM_BENCH = ("--vocab_size", "300", "--config_overrides", "num_hidden_layers=1,hidden_size=32,num_attention_heads=2",
                   "--pretrain_epochs", "1", "--epochs", "1", "--lora_epochs", "1", "--threads", "1")


def test_spam_bench_every_mode(tmp_path):
    out = run_bench("spam.py", "--data", str(spam_file(tmp_path / "spam.tsv")), "--output_dir", str(tmp_path / "run"),
                    *TINY_SPAM_BENCH, "--lm_loss_weight", "0.5")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    runs = results["runs"]
    assert set(runs) == {"from nothing (full)", "pretrained + full", "pretrained + lora", "pretrained + qlora"}
    for name, run in runs.items():
        assert name in out
        assert run["errors"] == round((1 - run["accuracy"]) * 100)  # 100 held-out messages (the last 20%)
        assert [entry["epoch"] for entry in run["per_epoch"]] == [1.0]
    assert runs["pretrained + lora"]["trainable_parameters"] < runs["pretrained + full"]["trainable_parameters"]
    assert runs["pretrained + qlora"]["linear_bytes"] < 0.35 * runs["pretrained + qlora"]["linear_fp32_bytes"]
    assert "label_curve" not in results
    # --lm_loss_weight reaches every run, the baseline's too
    for mode in ("from_nothing", "full", "lora", "qlora"):
        summary = json.loads((tmp_path / "run" / mode / "training_summary.json").read_text())
        assert summary["lm_loss_weight"] == 0.5, mode


def test_spam_bench_label_curve(tmp_path):
    bench_args = ("--data", str(spam_file(tmp_path / "spam.tsv")), "--output_dir", str(tmp_path / "run"),
                  *TINY_SPAM_BENCH, "--lora_epochs", "2", "--modes", "lora", "--label_counts", "50",
                  "--label_curve_seeds", "1")
    out = run_bench("spam.py", *bench_args)
    curve = json.loads((tmp_path / "run" / "results.json").read_text())["label_curve"]
    assert curve["counts"] == [50, 400] and curve["spam"] == {"50": 10, "400": 80}  # 50 labelled, and all 400
    assert set(curve["runs"]) == {"from nothing (full)", "pretrained + lora"}
    for runs in curve["runs"].values():
        assert [len(runs[count]) for count in ("50", "400")] == [1, 1]
    assert "labelled" in out and "label_curve.png" in out
    # at every count, the optimizer steps of the mode's run on all 400 messages (25 batches of 16 an epoch)
    def steps(start, count):
        summary = tmp_path / "run" / "label_curve" / f"{start}_labels{count}_seed42" / "training_summary.json"
        return json.loads(summary.read_text())["final_metrics"]["global_step"]
    assert steps("from_nothing", 50) == steps("from_nothing", 400) == 25
    assert steps("lora", 50) == steps("lora", 400) == 50
    assert (tmp_path / "run" / "label_curve.png").stat().st_size > 10_000

    # interrupted after every step but one: --resume reruns only that one and gives the same curve
    (tmp_path / "run" / "label_curve" / "lora_labels50_seed42" / "bench_step.json").unlink()
    out = run_bench("spam.py", *bench_args, "--resume")
    assert re.findall(r"== (\S+): hfgpt", out) == ["lora_labels50_seed42"]
    assert len(re.findall(r"reused \(--resume\)", out)) == 6  # pretrain, baseline, lora, 3 more curve runs
    resumed = json.loads((tmp_path / "run" / "results.json").read_text())["label_curve"]
    assert resumed["runs"]["from nothing (full)"] == curve["runs"]["from nothing (full)"]
    assert resumed["runs"]["pretrained + lora"]["400"] == curve["runs"]["pretrained + lora"]["400"]


def test_shakespeare_bench_one_configuration(tmp_path):
    rng = random.Random(0)
    (tmp_path / "text.txt").write_text("\n".join(sentence(rng, 10) for _ in range(400)))
    run_bench("shakespeare.py", "--data", str(tmp_path / "text.txt"), "--config", "char-modern-4x128-b64",
              "--time_budget", "2", "--threads", "1", "--results", str(tmp_path / "results.jsonl"))
    (result,) = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert result["config"] == "char-modern-4x128-b64" and result["steps"] > 0
    # nats per character, not per token or in bits: about log(261) untrained (uniform over the byte vocabulary) and
    # lower once trained. How far below depends on how many steps the 2 s budget held, i.e. on the machine's load,
    # so the bound is the units check alone.
    assert 0 < result["nats_per_char"] < 2 * math.log(261)


def test_model_speed_bench_prints_ratios():
    onednn = onednn_supported(torch.device("cpu"))[0]  # forced on, so that its rows are printed wherever it runs
    out = run_bench("model_speed.py", "--quick", "--shapes", "tiny", "--repeats", "1", "--threads", "1",
                    "--device", "cpu", "--no_memory", "--train_batch", "3", HFGPT_ONEDNN="1")
    assert "train batch 3 x 128" in out  # the tiny preset's context
    rows = [line.split() for line in out.splitlines() if line.startswith(("train ", "generate "))]
    # fp32 and bf16 against GPT-2 at the same precision, hfgpt's default against both, fp32 through oneDNN (eager and
    # compiled: as `--bf16 false` trains) against GPT-2's fp32; greedy decoding b1 and b4, each fp32, fp32
    # compiled, int8 and int8 compiled
    trained = 4 + (0 if not onednn else 2 if compiler_available(torch.device("cpu"))[0] else 1)
    assert [row[0] for row in rows] == ["train"] * trained + ["generate"] * 8
    if trained == 6:
        assert [" ".join(row[1:4]) for row in rows[4:6]] == ["hfgpt fp32 oneDNN", "hfgpt fp32 compiled"]
    assert [" ".join(row[3:5]) for row in rows[trained:trained + 4]] == ["fp32 vs", "fp32 compiled", "int8 vs",
                                                                       "int8 compiled"]
    for row in rows:
        ratio = float(row[-2])
        assert 0 < ratio < math.inf, row  # its size is the machine's business (load, threads), not the test's
    # hfgpt's decoding gives generate()'s tokens, and GPT-2's (the same weights), eager and compiled; int8's are
    # compared
    assert out.count("tokens identical to hfgpt's / GPT-2's generate(): fp32 True / True, "
                     "fp32 compiled True / True;") == 2
    assert len(re.findall(r"int8 tokens equal to fp32's: \d+% \(compiled \d+%\)", out)) == 2
    assert "MFU fp32 peak" in out and "matmul peak measured now" in out


def test_main_job_bench_compares_fp32_with_the_defaults():
    out = run_bench("main_job.py", "--extra", "--default_corpus_max_chars", "60000", "--max_steps", "3",
                    "--num_samples", "0", "--vocab_size", "300")
    rows = {line.split("  ")[0].strip(): line.split() for line in out.splitlines()
            if line.startswith(("fp32 eager (before)", "hfgpt defaults")) and "{" not in line and ":" not in line}
    assert set(rows) == {"fp32 eager (before)", "hfgpt defaults", "hfgpt defaults, fp32"}, out
    assert out.count("training time") == 2 and "of fp32 eager's" in out


def test_shakespeare_expert_load_sums_to_one_per_mixture_block(tiny_tokenizer, tiny_corpus):
    from hfgpt import HFGPTConfig, HFGPTForCausalLM

    shakespeare = load_bench("shakespeare")
    config = HFGPTConfig.from_preset("tiny", num_experts=4, num_experts_per_tok=2, moe_every_n_layers=2)
    model = HFGPTForCausalLM(config)
    load = shakespeare.expert_load(model, tiny_tokenizer, "".join(tiny_corpus), block_size=32, max_blocks=4)
    assert len(load) == 1 and len(load[0]) == 4  # one mixture block (every 2nd of 2), four experts
    assert abs(sum(load[0]) - 1) < 0.01
    assert shakespeare.expert_load(HFGPTForCausalLM(HFGPTConfig.from_preset("tiny")), tiny_tokenizer, "x", 32) is None


def test_quantization_bench_compares_int8_with_fp32(tmp_path):
    from hfgpt import HFGPTConfig, HFGPTForCausalLM
    from test_evaluation import CHAT_TEMPLATE, make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    HFGPTForCausalLM(HFGPTConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    rng = random.Random(0)
    rows = [{"instruction": sentence(rng, 5), "input": "", "output": sentence(rng, 6)} for _ in range(6)]
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    out = run_bench("quantization.py", "--model_dir", str(tmp_path / "lm"), "--prompts_file", str(data),
                    "--text_file", str(data), "--max_examples", "4", "--max_new_tokens", "4", "--batch_size", "2",
                    "--repeats", "1", "--threads", "1")
    measures = [line.split("  ")[0] for line in out.splitlines()[3:]]
    assert measures == ["perplexity", "answer seconds", "ROUGE-L vs references", "answers identical to fp32's"], out
    assert re.search(r"answers identical to fp32's\s+\d/4\s+ROUGE-L int8 vs fp32 answers [\d.]+", out), out


def test_gpu_checks_script_runs_every_check_and_records_each_exit_code(tmp_path):
    """bench/gpu_checks.sh is prepared for a session lent a GPU (minutes of device time, one try): here, without
    one, its checks fail or skip, but it must run all four, keep each output, and say how each ended."""
    env = dict(os.environ, OUT=str(tmp_path), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_checks.sh")], capture_output=True, text=True, env=env,
                          timeout=BENCH_TIMEOUT, cwd=REPO, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["device", "cuda_tests", "speed_small", "mfu_gpt2"]
    assert all(re.fullmatch(r"\S+ rc=\d+ seconds=\d+", line) for line in lines), lines
    assert "cuda_tests rc=0" in lines[1]  # every CUDA test skips cleanly without a GPU
    for name in ("device", "cuda_tests", "speed_small", "mfu_gpt2"):
        assert (tmp_path / f"{name}.txt").is_file()


@pytest.mark.skipif(not onednn_supported(torch.device("cpu"))[0], reason="this CPU or torch build has no oneDNN")
def test_linear_kernels_bench_prints_mkl_and_onednn_side_by_side(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40)
    out = run_bench("linear_kernels.py", "--preset", "tiny", "--rows", "1", "4", "--repeats", "1", "--threads", "1",
                    "--text", str(text), "--perplexity_chars", "1000")
    assert "tiny: 13 linear layers, 0.5 MB of fp32 weights" in out and "memory read bandwidth:" in out
    assert re.search(r"hfgpt's choice on this machine: (oneDNN|MKL) \(", out)
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0] in ("1", "4")]
    assert [row[0] for row in rows] == ["1", "4"] and all(float(row[-1].rstrip("x")) > 0 for row in rows)
    assert re.search(r"perplexity of 1,000 characters .*: MKL [\d.]+ s, oneDNN [\d.]+ s", out)

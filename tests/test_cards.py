"""Model cards: what write_model_card puts in README.md, the model-index metadata, and what it leaves out."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from huggingface_hub import EvalResult, ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from test_evaluation import CHAT_TEMPLATE, make_tokenizer

from hfgpt import HFGPTConfig, HFGPTForCausalLM, HFGPTForSequenceClassification, files
from hfgpt.cards import count_parameters, write_model_card
from hfgpt.cli import main as hfgpt_main

SUMMARY = {
    "task": "instruction tuning (SFT)",
    "train_files": ["corpus.txt"],
    "train_runtime_seconds": 12.5,
    "hyperparameters": {"learning_rate": 0.0006, "per_device_train_batch_size": 8, "max_steps": 40},
    "final_metrics": {"eval_loss": 5.25},
}
EVAL = {
    "perplexity": {"perplexity": 190.5, "mean_nll": 5.25, "num_tokens": 1000, "max_length": 128, "stride": 64,
                   "dataset": {"name": "valid.txt", "path": "/data/valid.txt"}},
    "rouge": {"rouge1": 0.25, "rouge2": 0.125, "rougeL": 0.2, "rougeLsum": 0.2, "num_examples": 10,
              "dataset": {"name": "prompts.jsonl"}},
}


def unique_parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


@pytest.fixture
def full_dir(tmp_path):
    """A model directory with everything a card can describe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    model = HFGPTForCausalLM(HFGPTConfig.from_preset("modern-tiny", vocab_size=len(tokenizer)))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    files.write_json(tmp_path / files.TRAINING_SUMMARY, SUMMARY)
    for name, results in EVAL.items():
        files.update_eval_results(tmp_path, name, results)
    plt.figure(figsize=(2, 2))
    plt.plot([3.0, 2.0, 1.5])
    plt.savefig(tmp_path / files.LOSS_CURVE)
    plt.close()
    return tmp_path, model


def table_value(text: str, row: str) -> str:
    match = re.search(rf"^\| {re.escape(row)} \| (.*) \|$", text, flags=re.MULTILINE)
    assert match, f"no table row {row!r}"
    return match.group(1)


def test_card_describes_the_full_directory(full_dir):
    path, model = full_dir
    write_model_card(path, model_id="someone/hfgpt-modern-tiny")
    card = ModelCard.load(path / files.MODEL_CARD)  # raises on metadata that does not parse
    text = card.text

    count = unique_parameter_count(model)
    assert table_value(text, "parameters").endswith(f"({count:,})")
    assert table_value(text, "attention") == "4 query heads, 2 key/value heads (grouped-query)"
    assert table_value(text, "position embeddings") == "rope (theta 10000.0)"
    assert table_value(text, "normalisation") == "rmsnorm, pre-norm"
    assert table_value(text, "MLP").startswith("swiglu")
    assert table_value(text, "vocabulary size") == "300"
    assert table_value(text, "chat template") == "yes"
    assert "\\|endoftext\\|" in table_value(text, "special tokens")  # escaped: a bare | would split the table
    # training summary: scalars and each nested table, with the numbers as written
    assert table_value(text, "task") == "instruction tuning (SFT)"
    assert table_value(text, "learning_rate") == "0.0006"
    assert table_value(text, "eval_loss") == "5.25"
    assert "**Hyperparameters**" in text and "**Final metrics**" in text
    assert f"![Training and validation loss]({files.LOSS_CURVE})" in text
    # eval table
    assert "| Text Generation | valid.txt | Perplexity | 190.5 |" in text
    assert "| Text Generation | prompts.jsonl | ROUGE-L | 0.2 |" in text
    # usage, with and without hfgpt
    assert 'AutoModelForCausalLM.from_pretrained("someone/hfgpt-modern-tiny", trust_remote_code=True)' in text
    assert "import hfgpt" in text and "apply_chat_template" in text and "pip install hfgpt" not in text
    assert "None" not in text

    data = card.data
    assert data.pipeline_tag == "text-generation" and data.library_name == "transformers"
    assert {"hfgpt", "custom_code", "conversational"} <= set(data.tags)
    assert data.model_name == "hfgpt-modern-tiny"
    results = {(r.dataset_name, r.metric_type): r for r in data.eval_results}
    assert set(results) == {("valid.txt", "perplexity"), ("prompts.jsonl", "rouge1"), ("prompts.jsonl", "rouge2"),
                            ("prompts.jsonl", "rougeL"), ("prompts.jsonl", "rougeLsum")}
    perplexity = results[("valid.txt", "perplexity")]
    assert (perplexity.metric_value, perplexity.task_type, perplexity.metric_args) == (
        190.5, "text-generation", {"max_length": 128, "stride": 64})
    assert results[("prompts.jsonl", "rouge2")].metric_value == 0.125
    # the raw model-index round-trips through huggingface_hub's own parser
    name, parsed = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "hfgpt-modern-tiny" and all(isinstance(r, EvalResult) for r in parsed) and len(parsed) == 5


def test_card_leaves_out_what_the_directory_lacks(tmp_path):
    torch.manual_seed(0)
    HFGPTForCausalLM(HFGPTConfig.from_preset("tiny")).save_pretrained(tmp_path)
    write_model_card(tmp_path)
    card = ModelCard.load(tmp_path / files.MODEL_CARD)
    text = card.text
    for section in ("## Tokenizer", "## Training", "## Evaluation", "loss_curve.png"):
        assert section not in text
    assert "model-index" not in card.data.to_dict() and card.data.eval_results is None
    assert "It has not been evaluated" in text
    assert "None" not in text and "nan" not in text.lower()
    assert table_value(text, "position embeddings") == "learned"
    assert table_value(text, "attention") == "4 heads (multi-head)"


def test_card_of_a_classifier_has_labels_and_confusion_matrix(tmp_path):
    tokenizer = make_tokenizer()
    config = HFGPTConfig.from_preset("tiny", vocab_size=len(tokenizer), num_labels=2, id2label={0: "ham", 1: "spam"},
                                     label2id={"ham": 0, "spam": 1})
    HFGPTForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    files.update_eval_results(tmp_path, "classification", {
        "accuracy": 0.75, "precision": 0.5, "recall": 0.625, "f1": 0.55, "average": "macro", "labels": [0, 1],
        "label_names": ["ham", "spam"], "confusion_matrix": [[5, 1], [1, 1]], "num_examples": 8,
        "dataset": {"name": "sms.tsv"}})
    assert hfgpt_main(["card", str(tmp_path), "--license", "apache-2.0", "--language", "en"]) == 0
    card = ModelCard.load(tmp_path / files.MODEL_CARD)
    assert card.data.pipeline_tag == "text-classification"
    assert card.data.license == "apache-2.0" and card.data.language == ["en"]
    assert table_value(card.text, "labels") == "0: ham, 1: spam"
    assert "| **ham** | 5 | 1 |" in card.text and "| **spam** | 1 | 1 |" in card.text
    assert "| Text Classification | sms.tsv | F1 (macro) | 0.55 |" in card.text
    assert "AutoModelForSequenceClassification.from_pretrained" in card.text
    f1 = next(r for r in card.data.eval_results if r.metric_type == "f1")
    assert f1.metric_args == {"average": "macro"} and f1.task_type == "text-classification"
    assert "conversational" not in card.data.tags


def test_parameter_count_from_sharded_safetensors(tmp_path):
    torch.manual_seed(0)
    model = HFGPTForCausalLM(HFGPTConfig.from_preset("tiny", tie_word_embeddings=False))
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert count_parameters(tmp_path) == unique_parameter_count(model)
    assert count_parameters(tmp_path / "nowhere") is None


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a model directory: it has no config.json"):
        write_model_card(tmp_path)


@pytest.mark.slow
def test_wheel_ships_the_card_template_and_metric_modules(tmp_path):
    """A non-editable install must contain the package data the card and the metrics load at run time."""
    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"
    shutil.copytree(repo / "hfgpt", source / "hfgpt", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("hfgpt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "hfgpt/templates/model_card.md" in names
    for metric in ("perplexity", "rouge", "accuracy", "classification"):
        assert f"hfgpt/evaluation/metrics/{metric}/{metric}.py" in names


def test_a_base_model_is_not_tagged_conversational_nor_shown_as_a_chat_model(full_dir):
    """hfgpt's tokenizers all carry the chat template; only chat training (SFT, DPO) makes a conversational model."""
    path, _ = full_dir
    files.write_json(path / files.TRAINING_SUMMARY, {**SUMMARY, "task": "causal language modeling (pretraining)"})
    card = ModelCard.load(write_model_card(path))
    assert "conversational" not in card.data.tags
    assert "apply_chat_template" not in card.text and 'tokenizer("Once upon a time"' in card.text
    assert "This is a base model" in card.text


def test_the_loss_curve_of_a_classifier_is_per_example(tmp_path, monkeypatch):
    from hfgpt.training import common

    labels = []
    monkeypatch.setattr("matplotlib.axes.Axes.set_ylabel", lambda self, label, *a, **k: labels.append(label))
    history = [{"step": 1, "loss": 0.7}, {"step": 2, "eval_loss": 0.6}]
    common.plot_loss_curve(history, tmp_path / "lm.png")
    common.plot_loss_curve(history, tmp_path / "cls.png", loss_per="example")
    assert labels == ["cross-entropy (nats per token)", "cross-entropy (nats per example)"]


SNIPPETS_CHILD = """
import sys
if sys.argv[1] == "without":
    sys.modules["hfgpt"] = None  # hfgpt is not installed here: `import hfgpt` raises ImportError
import torch
torch.manual_seed(0)
for code in sys.argv[2:]:
    exec(compile(code, "card snippet", "exec"), {})
"""


def _snippets(card_text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card_text, flags=re.DOTALL)


def test_the_cards_code_runs_as_written_with_and_without_hfgpt(full_dir, tmp_path_factory):
    """Each card's snippets, copied from the card: loading (remote code, then with hfgpt) and its example, for a base
    model, a chat model and a classifier. Without hfgpt, nothing may stop at transformers' interactive [y/N] prompt
    (stdin is closed)."""
    chat_dir, _ = full_dir
    tokenizer = make_tokenizer()
    base_dir = tmp_path_factory.mktemp("base")
    HFGPTForCausalLM(HFGPTConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    classifier_dir = tmp_path_factory.mktemp("classifier")
    HFGPTForSequenceClassification(HFGPTConfig.from_preset(
        "tiny", vocab_size=len(tokenizer), num_labels=2, id2label={0: "ham", 1: "spam"},
        label2id={"ham": 0, "spam": 1}, pad_token_id=tokenizer.pad_token_id)).save_pretrained(classifier_dir)
    tokenizer.save_pretrained(classifier_dir)
    programs = {"without": [], "with": []}
    for path in (chat_dir, base_dir, classifier_dir):
        remote, example, installed = _snippets(ModelCard.load(write_model_card(path)).text)
        assert "trust_remote_code=True" in remote and remote.count("trust_remote_code=True") == 2
        assert "import hfgpt" in installed and "trust_remote_code" not in installed
        programs["without"].append(remote + example)
        programs["with"].append(installed + example)
    work = tmp_path_factory.mktemp("child")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(work / "modules")
    for mode, codes in programs.items():
        result = subprocess.run([sys.executable, "-c", SNIPPETS_CHILD, mode, *codes], cwd=work, env=env,
                                capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, (mode, result.stderr[-3000:])
        assert "[y/N]" not in result.stdout + result.stderr  # transformers asked whether to run the remote code
        assert result.stdout.strip().splitlines()[-1] in ("ham", "spam")  # the classifier's example printed a label

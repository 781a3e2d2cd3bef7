"""Evaluation: the offline `evaluate` modules (perplexity, ROUGE, accuracy, classification) against hand-computed or
reference-library numbers, their errors on bad input, and the `hfgpt eval` runners."""

import json
import re
import math
import os
import subprocess
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from hfgpt import HFGPTConfig, HFGPTForCausalLM, HFGPTForSequenceClassification, files
from hfgpt.cli import main as hfgpt_main
from hfgpt.evaluation import METRIC_NAMES, metric_path
from hfgpt.evaluation.perplexity import compute_perplexity, sliding_windows
from hfgpt.files import EVAL_RESULTS, read_json

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be, or not to be, that is the question.",
    "All that glitters is not gold; all that wander are not lost.",
] * 5

TEXTS = [
    "The fox jumps over the dog.",
    "To be or not to be.",
    "A single step begins a journey of a thousand miles, and the lazy dog sleeps all day long.",
]


def make_tokenizer(with_bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on a few sentences (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    special = {"bos_token": "<|endoftext|>"} if with_bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", **special)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def make_gpt2(vocab_size: int, n_positions: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return make_gpt2(len(tokenizer))


def hand_perplexities(model, tokenizer, texts, add_start_token=True):
    """exp(mean NLL) per text from one full forward pass each, and over all tokens together."""
    nlls, counts = [], []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([([tokenizer.bos_token_id] if add_start_token else []) + ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        token_nll = -log_probs.gather(1, ids[0, 1:, None]).squeeze(1)
        nlls.append(token_nll.sum().item())
        counts.append(token_nll.numel())
    return [math.exp(n / c) for n, c in zip(nlls, counts)], math.exp(sum(nlls) / sum(counts)), sum(counts)


def hand_strided_nll(model, ids: torch.Tensor, max_length: int, stride: int):
    """The loop of the transformers perplexity guide, written out independently: windows start every `stride`
    tokens; the tokens the previous window did not reach are the labels (the rest -100); the model's own loss."""
    total_nll, total_count, previous_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + max_length, ids.size(1))
        target_length = end - previous_end
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-target_length] = -100
        count = (labels[:, 1:] != -100).sum().item()  # the model shifts labels left by one
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss
        total_nll += loss.item() * count
        total_count += count
        previous_end = end
        if end == ids.size(1):
            break
    return total_nll, total_count


# --- metric modules -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_metric_modules_load_offline(name):
    module = evaluate.load(metric_path(name))
    assert isinstance(module, evaluate.Metric)


def test_metric_path_unknown_name():
    with pytest.raises(ValueError, match="hfgpt ships: perplexity, rouge"):
        metric_path("bleu")


# --- perplexity -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens,max_length,stride",
                         [(40, 16, 6), (40, 16, 15), (16, 16, 8), (17, 16, 1), (3, 8, 4)])
def test_sliding_windows_score_every_token_once(num_tokens, max_length, stride):
    windows = sliding_windows(num_tokens, max_length, stride)
    targets = [t for _, end, first in windows for t in range(first, end)]
    assert targets == list(range(1, num_tokens))  # each token but the first, exactly once, in order
    for index, (begin, end, first) in enumerate(windows):
        assert end - begin <= max_length
        if index:  # past the first window every scored token sees at least max_length - stride tokens of context
            assert first - begin >= max_length - stride


def test_sliding_windows_reject_bad_stride():
    for stride in (0, 16, 20):
        with pytest.raises(ValueError, match=r"stride=\d+ must be in \[1, max_length - 1\]"):
            sliding_windows(40, 16, stride)


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_perplexity_equals_exp_mean_token_nll(gpt2, tokenizer, batch_size):
    expected, corpus, count = hand_perplexities(gpt2, tokenizer, TEXTS)
    result = compute_perplexity(TEXTS, gpt2, tokenizer, batch_size=batch_size, progress=False)
    assert result["perplexities"] == pytest.approx(expected, rel=1e-5)
    assert result["mean_perplexity"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert result["perplexity"] == pytest.approx(corpus, rel=1e-5)
    assert result["num_tokens"] == count
    assert result["max_length"] == gpt2.config.n_positions


def test_perplexity_without_start_token_skips_first_token(gpt2, tokenizer):
    expected, corpus, count = hand_perplexities(gpt2, tokenizer, TEXTS, add_start_token=False)
    result = compute_perplexity(TEXTS, gpt2, tokenizer, add_start_token=False, progress=False)
    assert result["perplexities"] == pytest.approx(expected, rel=1e-5)
    assert result["num_tokens"] == count == sum(len(tokenizer(t)["input_ids"]) - 1 for t in TEXTS)


@pytest.mark.parametrize("max_length,stride", [(16, 6), (12, 11), (10, 1)])
def test_perplexity_sliding_window_matches_hand_computed_strided_nll(gpt2, tokenizer, max_length, stride):
    text = " ".join(CORPUS[:4])
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
    assert ids.size(1) > 3 * max_length  # several windows
    nll, count = hand_strided_nll(gpt2, ids, max_length, stride)
    assert count == ids.size(1) - 1
    result = compute_perplexity([text], gpt2, tokenizer, max_length=max_length, stride=stride, batch_size=3,
                                progress=False)
    assert result["num_tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # less context per token than the full-sequence pass, so a different (here: any finite) number
    full = compute_perplexity([text], gpt2, tokenizer, progress=False)["perplexity"]
    assert result["perplexity"] != pytest.approx(full, rel=1e-6)


def test_perplexity_of_a_text_longer_than_the_context_warns_nothing(gpt2, tokenizer, monkeypatch):
    """The sliding window is how a long text is scored: transformers' "sequence length is longer than the specified
    maximum" warning, printed while tokenizing it, says nothing the user can act on."""
    import copy

    import transformers.tokenization_utils_base as base

    warned = []
    monkeypatch.setattr(base.logger, "warning", lambda message, *args, **kwargs: warned.append(message))
    short = copy.deepcopy(tokenizer)
    short.model_max_length = 16
    text = " ".join(CORPUS[:4])
    compute_perplexity([text], gpt2, short, max_length=16, stride=8, progress=False)
    assert not [message for message in warned if "longer than the specified maximum" in str(message)]


def test_perplexity_on_hfgpt_model(tiny_model, tokenizer):
    expected, corpus, _ = hand_perplexities(tiny_model, tokenizer, TEXTS)
    result = compute_perplexity(TEXTS, tiny_model, tokenizer, batch_size=2, progress=False)
    assert result["perplexities"] == pytest.approx(expected, rel=1e-5)
    text = " ".join(CORPUS[:4])
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
    nll, count = hand_strided_nll(tiny_model, ids, 24, 8)
    windowed = compute_perplexity([text], tiny_model, tokenizer, max_length=24, stride=8, progress=False)
    assert windowed["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_module_from_path_equals_in_memory(gpt2, tokenizer, tmp_path):
    gpt2.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    module = evaluate.load(metric_path("perplexity"))
    in_memory = module.compute(predictions=TEXTS, model=gpt2, tokenizer=tokenizer, progress=False)
    from_path = module.compute(predictions=TEXTS, model=str(tmp_path), device="cpu", progress=False)
    hub_style = module.compute(predictions=TEXTS, model_id=str(tmp_path), batch_size=1, progress=False)
    assert from_path["perplexities"] == pytest.approx(in_memory["perplexities"], rel=1e-5)
    assert hub_style["mean_perplexity"] == pytest.approx(in_memory["mean_perplexity"], rel=1e-5)


def test_perplexity_bad_input(gpt2, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        compute_perplexity([], gpt2, tokenizer)
    with pytest.raises(ValueError, match="Text 1 .* nothing to score"):
        compute_perplexity(["fine text", ""], gpt2, tokenizer, add_start_token=False, progress=False)
    with pytest.raises(ValueError, match="needs a tokenizer with a BOS token"):
        compute_perplexity(TEXTS, gpt2, make_tokenizer(with_bos=False), add_start_token=True)
    with pytest.raises(ValueError, match="longer than the model's context"):
        compute_perplexity(TEXTS, gpt2, tokenizer, max_length=1000)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        compute_perplexity(TEXTS, gpt2)
    with pytest.raises(TypeError, match="single string"):
        compute_perplexity("one text", gpt2, tokenizer)
    gpt2.save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.*tokenizer.save_pretrained"):
        compute_perplexity(TEXTS, str(tmp_path / "no_tokenizer"))
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        compute_perplexity(TEXTS, str(tmp_path), tokenizer)
    with pytest.raises(ValueError, match="exactly one of `model`"):
        evaluate.load(metric_path("perplexity")).compute(predictions=TEXTS)


# --- ROUGE ----------------------------------------------------------------------------------------------------------

PREDICTIONS = ["the cat sat on the mat", "hello there general kenobi", "a b c d e f", "running dogs barked loudly"]
REFERENCES = ["the cat is on the mat", "hello there", "a b d e g", "the dog runs and barks"]


def rouge_score_reference(predictions, references, use_stemmer=False, seed=None):
    """rouge_score used directly, the way the Hub's rouge metric uses it."""
    from rouge_score import rouge_scorer, scoring

    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=use_stemmer)
    scores = [scorer.score_multi(r, p) if isinstance(r, list) else scorer.score(r, p)
              for p, r in zip(predictions, references)]
    per_example = {t: [s[t].fmeasure for s in scores] for t in types}
    if seed is None:
        return per_example
    np.random.seed(seed)
    aggregator = scoring.BootstrapAggregator()
    for s in scores:
        aggregator.add_scores(s)
    return {t: v.mid.fmeasure for t, v in aggregator.aggregate().items()}


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_matches_rouge_score(use_stemmer):
    rouge = evaluate.load(metric_path("rouge"), seed=42)  # evaluate seeds numpy for the bootstrap aggregator
    aggregated = rouge.compute(predictions=PREDICTIONS, references=REFERENCES, use_stemmer=use_stemmer)
    assert aggregated == rouge_score_reference(PREDICTIONS, REFERENCES, use_stemmer, seed=42)
    per_example = rouge.compute(predictions=PREDICTIONS, references=REFERENCES, use_stemmer=use_stemmer,
                                use_aggregator=False)
    expected = rouge_score_reference(PREDICTIONS, REFERENCES, use_stemmer)
    assert per_example == expected
    for name, scores in expected.items():  # the bootstrap mid sits next to the plain mean
        assert aggregated[name] == pytest.approx(np.mean(scores), abs=0.05)
    if use_stemmer:  # "running"/"runs", "dogs"/"dog" match only after stemming
        assert per_example["rouge1"][3] > rouge_score_reference(PREDICTIONS, REFERENCES)["rouge1"][3]


def test_rouge_multiple_references_and_custom_tokenizer():
    rouge = evaluate.load(metric_path("rouge"))
    references = [[r, p] for r, p in zip(REFERENCES, PREDICTIONS)]
    result = rouge.compute(predictions=PREDICTIONS, references=references, use_aggregator=False)
    assert result == rouge_score_reference(PREDICTIONS, references)
    assert result["rouge1"] == [1.0] * len(PREDICTIONS)  # the prediction itself is among the references
    by_character = rouge.compute(predictions=["abc"], references=["abd"], tokenizer=list, rouge_types=["rouge1"])
    assert by_character["rouge1"] == pytest.approx(2 / 3)


def test_rouge_lsum_splits_on_newlines():
    rouge = evaluate.load(metric_path("rouge"))
    prediction, reference = "b c\na b", "a b\nb c"
    result = rouge.compute(predictions=[prediction], references=[reference], use_aggregator=False)
    assert result["rougeLsum"] == [1.0]  # every sentence finds its match
    assert result["rougeL"][0] < 1.0  # one flat sequence: order matters


def test_rouge_bad_input():
    rouge = evaluate.load(metric_path("rouge"))
    with pytest.raises(ValueError, match="`predictions` is empty"):
        rouge.compute(predictions=[], references=[])
    with pytest.raises(ValueError, match="Got 2 predictions but 1 references"):
        rouge.compute(predictions=["a", "b"], references=["a"])
    with pytest.raises(ValueError, match="Unknown rouge_types"):
        rouge.compute(predictions=["a"], references=["a"], rouge_types=["rougeX"])


# --- accuracy and classification ------------------------------------------------------------------------------------

Y_TRUE = [0, 1, 2, 2, 1, 0, 0, 2, 1, 1]
Y_PRED = [0, 2, 2, 2, 1, 0, 1, 0, 1, 1]


def test_accuracy_matches_scikit_learn():
    from sklearn.metrics import accuracy_score

    accuracy = evaluate.load(metric_path("accuracy"))
    assert accuracy.compute(predictions=Y_PRED, references=Y_TRUE) == {"accuracy": accuracy_score(Y_TRUE, Y_PRED)}
    weights = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]
    assert accuracy.compute(predictions=Y_PRED, references=Y_TRUE, sample_weight=weights, normalize=False)[
        "accuracy"] == accuracy_score(Y_TRUE, Y_PRED, sample_weight=weights, normalize=False)
    multilabel = evaluate.load(metric_path("accuracy"), "multilabel")
    pred, true = [[0, 1], [1, 1], [1, 0]], [[0, 1], [1, 0], [1, 0]]
    assert multilabel.compute(predictions=pred, references=true)["accuracy"] == accuracy_score(np.array(true),
                                                                                             np.array(pred))


@pytest.mark.parametrize("average", ["macro", "micro", "weighted", None])
def test_classification_matches_scikit_learn(average):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

    result = evaluate.load(metric_path("classification")).compute(predictions=Y_PRED, references=Y_TRUE,
                                                                  average=average)
    expected = {
        "precision": precision_score(Y_TRUE, Y_PRED, average=average),
        "recall": recall_score(Y_TRUE, Y_PRED, average=average),
        "f1": f1_score(Y_TRUE, Y_PRED, average=average),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(result[name], value, rtol=1e-12)
    assert result["accuracy"] == accuracy_score(Y_TRUE, Y_PRED)
    assert result["labels"] == [0, 1, 2]
    assert result["confusion_matrix"] == confusion_matrix(Y_TRUE, Y_PRED).tolist()


def test_classification_binary_average_is_the_hub_default():
    from sklearn.metrics import f1_score, precision_score, recall_score

    true, pred = [0, 1, 1, 0, 1, 1], [0, 1, 0, 1, 1, 1]
    result = evaluate.load(metric_path("classification")).compute(predictions=pred, references=true, average="binary")
    assert (result["precision"], result["recall"], result["f1"]) == (
        precision_score(true, pred), recall_score(true, pred), f1_score(true, pred))
    assert result["confusion_matrix"] == [[1, 1], [1, 3]]


@pytest.mark.parametrize("name", ["accuracy", "classification"])
def test_classification_bad_input(name):
    module = evaluate.load(metric_path(name))
    with pytest.raises(ValueError, match="`predictions` is empty"):
        module.compute(predictions=[], references=[])
    with pytest.raises(ValueError, match="Mismatch in the number of predictions|Got 3 predictions but 2"):
        module.compute(predictions=[0, 1, 1], references=[0, 1])
    from hfgpt.evaluation.classification import compute_accuracy, compute_classification

    with pytest.raises(ValueError, match="Got 3 predictions but 2 references"):
        (compute_accuracy if name == "accuracy" else compute_classification)([0, 1, 1], [0, 1])
    if name == "classification":
        with pytest.raises(ValueError, match="average='mean' is not supported"):
            module.compute(predictions=[0, 1], references=[0, 1], average="mean")


# --- runners: `hfgpt eval ...` and eval/*.py -------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture
def lm_dir(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    model = HFGPTForCausalLM(HFGPTConfig.from_preset("tiny", vocab_size=len(tokenizer))).eval()
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    return tmp_path / "lm", model, tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_eval_perplexity_script_runs_offline_and_saves_results(lm_dir, tmp_path):
    path, model, tokenizer = lm_dir
    data = write_jsonl(tmp_path / "texts.jsonl", [{"body": t} for t in TEXTS] + [{"body": "  "}])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "eval" / "perplexity.py"), "--model_name_or_path", str(path), "--file", str(data),
         "--text_column", "body", "--max_length", "16", "--stride", "5", "--batch_size", "4", "--device", "cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = read_json(path / EVAL_RESULTS)["perplexity"]
    expected = compute_perplexity(TEXTS, model, tokenizer, max_length=16, stride=5, progress=False)
    assert saved["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert (saved["num_texts"], saved["skipped_empty_texts"], saved["stride"]) == (3, 1, 5)
    assert saved["dataset"]["name"] == "texts.jsonl"
    assert f'"perplexity": {saved["perplexity"]}' in result.stdout


def test_eval_perplexity_of_a_text_file_is_one_windowed_text(lm_dir, tmp_path):
    path, model, tokenizer = lm_dir
    text = " ".join(CORPUS[:6])
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    assert hfgpt_main(["eval", "perplexity", "--model_name_or_path", str(path), "--file", str(tmp_path / "corpus.txt"),
                       "--max_length", "32", "--stride", "8", "--results_dir", str(tmp_path / "results")]) == 0
    saved = read_json(tmp_path / "results" / EVAL_RESULTS)["perplexity"]
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
    nll, count = hand_strided_nll(model, ids, 32, 8)
    assert saved["num_tokens"] == count and saved["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_eval_rouge_from_predictions_file(lm_dir, tmp_path):
    path, _, _ = lm_dir
    rows = [{"prediction": p, "reference": r} for p, r in zip(PREDICTIONS, REFERENCES)]
    data = write_jsonl(tmp_path / "predictions.jsonl", rows)
    assert hfgpt_main(["eval", "rouge", "--predictions_file", str(data), "--results_dir", str(path),
                       "--seed", "7"]) == 0
    saved = read_json(path / EVAL_RESULTS)["rouge"]
    expected = rouge_score_reference(PREDICTIONS, REFERENCES, seed=7)
    assert {name: saved[name] for name in expected} == expected
    assert saved["num_examples"] == 4


def test_eval_rouge_generates_through_the_chat_template(lm_dir, tmp_path):
    path, model, tokenizer = lm_dir
    rows = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Repeat the word.", "input": "fox", "output": "fox"},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
    ]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "generated.jsonl"
    assert hfgpt_main(["eval", "rouge", "--model_name_or_path", str(path), "--prompts_file", str(data),
                       "--max_new_tokens", "6", "--batch_size", "2", "--save_predictions", str(out)]) == 0
    generated = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["reference"] for g in generated] == ["Blue.", "fox", "hi"]
    # each batched, left-padded generation equals the prompt generated alone through the chat template
    for row in generated:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        assert prompt.endswith("assistant:") and prompt.startswith("<|endoftext|>user: ")
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        # the explicit mask matters: the prompt starts with <|endoftext|>, which is also the pad token, and generate
        # would otherwise infer that it is padding
        alone = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)
        assert row["prediction"] == tokenizer.decode(alone[0, ids.size(1):], skip_special_tokens=True).strip()
    saved = read_json(path / EVAL_RESULTS)["rouge"]
    assert saved["chat_template"] is True and saved["num_examples"] == 3
    expected = rouge_score_reference([g["prediction"] for g in generated], ["Blue.", "fox", "hi"], seed=42)
    assert {name: saved[name] for name in expected} == expected  # 42: the runner's default --seed


@pytest.fixture
def classifier_dir(tmp_path):
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = HFGPTConfig.from_preset("tiny", vocab_size=len(tokenizer), num_labels=3,
                                     id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    model = HFGPTForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "classifier")
    tokenizer.save_pretrained(tmp_path / "classifier")
    return tmp_path / "classifier", model, tokenizer


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_eval_classification_matches_scikit_learn(classifier_dir, tmp_path, suffix):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    path, model, tokenizer = classifier_dir
    texts = [t.replace(",", "") for t in CORPUS[:4] + TEXTS]
    labels = ["neg", "pos", "neu", "pos", "neg", "neu", "pos"]
    data = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        write_jsonl(data, [{"sentence": t, "y": y} for t, y in zip(texts, labels)])
    else:
        sep = "\t" if suffix == ".tsv" else ","
        data.write_text("y" + sep + "sentence\n" + "".join(f"{y}{sep}{t}\n" for t, y in zip(texts, labels)))
    assert hfgpt_main(["eval", "classification", "--model_name_or_path", str(path), "--file", str(data),
                       "--text_column", "sentence", "--label_column", "y", "--batch_size", "3"]) == 0
    saved = read_json(path / EVAL_RESULTS)["classification"]
    with torch.no_grad():  # one text at a time: no padding involved
        predicted = [model(torch.tensor([tokenizer(t)["input_ids"]])).logits.argmax(-1).item() for t in texts]
    true = [config_id for config_id in (model.config.label2id[y] for y in labels)]
    assert saved["accuracy"] == accuracy_score(true, predicted)
    assert saved["f1"] == pytest.approx(f1_score(true, predicted, average="macro", labels=[0, 1, 2], zero_division=0))
    assert saved["confusion_matrix"] == confusion_matrix(true, predicted, labels=[0, 1, 2]).tolist()
    assert saved["label_names"] == ["neg", "neu", "pos"] and saved["num_examples"] == 7


def test_eval_runners_bad_input(classifier_dir, lm_dir, tmp_path, capsys):
    """Bad input is one message on stderr and exit status 1, not a traceback."""
    cls_path, _, _ = classifier_dir
    lm_path, model, _ = lm_dir
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": "good", "label": "great"}])

    def error_of(*argv):
        capsys.readouterr()
        assert hfgpt_main(["eval", *argv]) == 1
        return capsys.readouterr().err

    assert re.search("label values the model was not trained on: 'great'.*'neg', 'neu', 'pos'",
                     error_of("classification", "--model_name_or_path", str(cls_path), "--file", str(data)))
    assert "row 1 has no column 'sentence'; its columns are 'text', 'label'" in error_of(
        "classification", "--model_name_or_path", str(cls_path), "--file", str(data), "--text_column", "sentence")
    no_tokenizer = tmp_path / "no_tokenizer"
    model.save_pretrained(no_tokenizer)
    assert "has no tokenizer" in error_of("perplexity", "--model_name_or_path", str(no_tokenizer), "--file", str(data))
    with pytest.raises(SystemExit) as exit_info:  # neither a predictions file nor prompts
        hfgpt_main(["eval", "rouge", "--model_name_or_path", str(lm_path)])
    assert exit_info.value.code == 2 and "either --predictions_file" in capsys.readouterr().err
    empty = write_jsonl(tmp_path / "empty_predictions.jsonl", [])
    assert "holds no rows" in error_of("rouge", "--predictions_file", str(empty))
    assert hfgpt_main(["eval", "bleu"]) == 2


def test_eval_keeps_results_per_dataset_and_refuses_training_data(classifier_dir, tmp_path, capsys):
    """A score on other data goes beside the run's held-out score, never over it; the run's own training file is
    refused (or, with --allow_training_data, marked and kept out of the card's model-index)."""
    from huggingface_hub import ModelCard

    from hfgpt.cards import write_model_card

    path, _, _ = classifier_dir
    rows = [{"text": t, "label": y} for t, y in zip(TEXTS, ["neg", "pos", "neu"])]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    files.write_json(path / files.TRAINING_SUMMARY, {"train_files": [str(train)],
                                                       files.TRAINING_DATA_FILES: [files.fingerprint(train)]})
    held_out = {"accuracy": 0.5, "dataset": {"name": "train.jsonl", "split": "validation"}}
    files.update_eval_results(path, "classification", held_out)

    copy = tmp_path / "elsewhere" / "same-rows.jsonl"  # a copy under another name is still the training data
    copy.parent.mkdir()
    copy.write_bytes(train.read_bytes())
    for data in (train, copy):
        capsys.readouterr()
        assert hfgpt_main(["eval", "classification", "--model_name_or_path", str(path), "--file", str(data)]) == 1
        error = capsys.readouterr().err
        assert "a file this model was trained on" in error and "--allow_training_data" in error
    assert read_json(path / EVAL_RESULTS) == {"classification": held_out}

    other = write_jsonl(tmp_path / "test.jsonl", rows[::-1])
    assert hfgpt_main(["eval", "classification", "--model_name_or_path", str(path), "--file", str(other)]) == 0
    assert hfgpt_main(["eval", "classification", "--model_name_or_path", str(path), "--file", str(train),
                       "--allow_training_data"]) == 0
    assert "Warning" in capsys.readouterr().err
    saved = read_json(path / EVAL_RESULTS)
    assert saved["classification"] == held_out  # the held-out score is still there
    assert saved["classification@test.jsonl"]["dataset"] == {"name": "test.jsonl", "text_column": "text",
                                                             "label_column": "label"}  # no local path
    assert saved["classification@train.jsonl"]["dataset"]["training_data"] is True
    # the same dataset again replaces its own entry only
    assert hfgpt_main(["eval", "classification", "--model_name_or_path", str(path), "--file", str(other)]) == 0
    assert set(read_json(path / EVAL_RESULTS)) == set(saved)

    card = ModelCard.load(write_model_card(path))
    assert "| train.jsonl (training data) | Accuracy |" in card.text
    published = {(result.dataset_name, result.dataset_split) for result in card.data.eval_results}
    assert published == {("train.jsonl", "validation"), ("test.jsonl", None)}


def test_rouge_prompts_follow_the_training_formatting(tmp_path):
    """Prompt rows mean what they mean to SFT/DPO (hfgpt.data.chat); explicit prompt/reference columns pass through."""
    from hfgpt.data.chat import conversation
    from hfgpt.evaluation.cli import prompt_and_reference

    alpaca = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    prompt, reference = prompt_and_reference(alpaca, 0, "p.jsonl")
    assert prompt + [{"role": "assistant", "content": reference}] == conversation(alpaca)
    assert prompt_and_reference({"question": "Hi?", "answer": "Hello."}, 1, "p.jsonl", "question", "answer") == (
        "Hi?", "Hello.")
    with pytest.raises(ValueError, match="row 2 has 'prompt' but no 'reference'"):
        prompt_and_reference({"prompt": "Hi?"}, 2, "p.jsonl")
    with pytest.raises(ValueError, match="not an instruction row"):
        prompt_and_reference({"text": "free text"}, 3, "p.jsonl")

"""Classification fine-tuning: labelled data, what trains, the loss, and `hfgpt classify` end to end on tiny data."""

import json
import random
import re
import tempfile

import pytest
import torch

import hfgpt  # noqa: F401  (registers the Auto classes)
from hfgpt import HFGPTConfig, HFGPTForCausalLM, HFGPTForSequenceClassification, files
from hfgpt.cli import main as hfgpt_main
from hfgpt.data.labels import encode_labels, load_labelled_datasets
from hfgpt.data.sources import DataError
from hfgpt.training.classification import (
    WeightedCrossEntropy,
    class_weights_from,
    freeze_all_but_last_blocks,
    main,
)


def _write_rows(path, rows, header=("label", "text")):
    separator = "\t" if path.suffix == ".tsv" else ","
    lines = [separator.join(header)] + [separator.join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toy_rows(count, seed=0):
    """Two classes a tiny model separates in a few steps: the label decides the words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.choice(["ham", "spam"])
        words = ["see you at lunch", "ok thanks mum", "running late"] if label == "ham" else \
                ["WIN a FREE prize now", "call 0800 to claim CASH", "URGENT txt WIN"]
        rows.append((label, f"{rng.choice(words)} {rng.randint(0, 99)}"))
    return rows


@pytest.fixture(scope="module")
def base_dir(tiny_tokenizer):
    """A tiny causal LM with its tokenizer on disk: what `hfgpt classify` starts from."""
    torch.manual_seed(0)
    path = tempfile.mkdtemp(prefix="hfgpt-classify-base-")
    config = HFGPTConfig.from_preset("tiny", pad_token_id=tiny_tokenizer.pad_token_id)
    HFGPTForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _run(argv):
    return main([*argv, "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no",
                 "--dataloader_num_workers", "0"])


# --- labelled data ----------------------------------------------------------------------------------------------------


def test_label_names_become_class_ids(tmp_path):
    train = _write_rows(tmp_path / "train.tsv", [("spam", "a"), ("ham", "b"), ("ham", "c"), ("spam", "d")])
    data, names = load_labelled_datasets(train, validation_split_percentage=25)
    assert names == ["ham", "spam"]  # sorted: spam is class 1, the positive class of the binary F1
    assert data["train"]["label"] == [1, 0, 0] and data["validation"]["label"] == [1]
    assert data["train"].column_names == ["text", "label"]
    _, names = load_labelled_datasets(train, validation_split_percentage=25, label_names=["spam", "ham"])
    assert names == ["spam", "ham"]


def test_integer_labels_keep_their_ids_and_classlabel_keeps_its_names(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 11}) + "\n" for i in range(22)))
    _, names = load_labelled_datasets(rows, validation_split_percentage=0)
    assert names == [str(i) for i in range(11)]  # numerically, not "0", "1", "10", "2", ...

    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "neu", "pos"])})
    saved = tmp_path / "saved"
    Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [2, 0, 2, 0]}, features=features).save_to_disk(saved)
    data, names = load_labelled_datasets(dataset_name=str(saved), validation_split_percentage=0)
    assert names == ["neg", "neu", "pos"] and data["train"]["label"] == [2, 0, 2, 0]


def test_tsv_text_may_start_with_a_quote(tmp_path):
    """TSV has no quoting: an opening '"' must not swallow the following rows (sms_spam.tsv has such messages)."""
    train = _write_rows(tmp_path / "train.tsv", [("ham", '"Hi," she said'), ("spam", "WIN now"), ("ham", "ok")])
    data, _ = load_labelled_datasets(train, validation_split_percentage=0)
    assert data["train"]["text"] == ['"Hi," she said', "WIN now", "ok"]


def test_unknown_label_at_evaluation_is_an_error(tmp_path):
    train = _write_rows(tmp_path / "train.csv", [("ham", "a"), ("spam", "b")])
    validation = _write_rows(tmp_path / "validation.csv", [("ham", "c"), ("scam", "d"), ("Spam", "e")])
    with pytest.raises(DataError, match=r"validation split.*'scam' \(first at row 1\).*'Spam'.*known labels are 'ham', "
                                        r"'spam'"):
        load_labelled_datasets(train, validation)
    with pytest.raises(DataError, match="not trained on: 'maybe'"):
        encode_labels(["ham", "maybe"], {"ham": 0, "spam": 1})


def test_missing_column_names_the_columns_that_exist(tmp_path):
    train = _write_rows(tmp_path / "train.csv", [("ham", "a"), ("spam", "b")], header=("category", "message"))
    with pytest.raises(DataError, match=r"no column 'text', 'label'; its columns are 'category', 'message'. "
                                        r"Choose them with --text_column and --label_column"):
        load_labelled_datasets(train, validation_split_percentage=0)
    with pytest.raises(DataError, match=r"no column 'label'; .* Choose one with --label_column\.$"):
        load_labelled_datasets(train, text_column="message", validation_split_percentage=0)
    data, names = load_labelled_datasets(train, text_column="message", label_column="category",
                                         validation_split_percentage=0)
    assert names == ["ham", "spam"] and data["train"]["message"] == ["a", "b"]


# --- what trains, and the loss ----------------------------------------------------------------------------------------


def test_train_last_n_blocks_freezes_the_rest():
    model = HFGPTForSequenceClassification(HFGPTConfig.from_preset("tiny", num_hidden_layers=3, num_labels=2))
    freeze_all_but_last_blocks(model, 1)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(name.startswith(("transformer.h.2.", "transformer.ln_f.", "score.")) for name in trainable)
    assert "score.weight" in trainable and "transformer.h.2.attn.q_proj.weight" in trainable
    assert not model.transformer.wte.weight.requires_grad and not model.transformer.h[1].mlp.up_proj.weight.requires_grad
    with pytest.raises(ValueError, match="has 3 blocks; choose 1 to 3"):
        freeze_all_but_last_blocks(model, 4)


def test_class_weights():
    balanced = class_weights_from("balanced", [0, 0, 0, 1], ["ham", "spam"])
    torch.testing.assert_close(balanced, torch.tensor([4 / 6, 4 / 2]))  # scikit-learn's n / (k * count)
    torch.testing.assert_close(class_weights_from("1, 6.5", [0, 1], ["ham", "spam"]), torch.tensor([1.0, 6.5]))
    with pytest.raises(ValueError, match="need 2 positive numbers.*ham, spam"):
        class_weights_from("1,2,3", [0, 1], ["ham", "spam"])
    with pytest.raises(ValueError, match="'balanced' or one number per class"):
        class_weights_from("heavy", [0, 1], ["ham", "spam"])
    with pytest.raises(DataError, match=r"no rows of class\(es\) \['spam'\]"):
        class_weights_from("balanced", [0, 0], ["ham", "spam"])


@pytest.mark.parametrize("weighted, lm_loss_weight", [(False, 0.0), (True, 0.0), (False, 0.5), (True, 0.5)])
def test_gradient_accumulation_matches_one_large_batch(weighted, lm_loss_weight, tmp_path):
    """Trainer hands the loss the number of rows of the accumulated batch; the head's loss (and the weighted loss)
    must use it, or accumulating N micro-batches multiplies the update by N. The auxiliary LM loss (a mean per
    micro-batch) must be scaled to match."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from hfgpt.training.classification import ClassificationTrainer

    torch.manual_seed(0)
    config = HFGPTConfig.from_preset("tiny", num_labels=2, pad_token_id=1)
    reference = HFGPTForSequenceClassification(config)
    rows = Dataset.from_dict({"input_ids": torch.randint(2, 512, (4, 8)).tolist(), "labels": [0, 1, 1, 1]})
    updates = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = HFGPTForSequenceClassification(config)
        model.load_state_dict(reference.state_dict())
        args = TrainingArguments(output_dir=str(tmp_path / f"run{accumulation}"), per_device_train_batch_size=batch_size,
                                 gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
                                 lr_scheduler_type="constant", max_grad_norm=0.0, report_to="none", disable_tqdm=True,
                                 train_sampling_strategy="sequential", save_strategy="no")
        loss = WeightedCrossEntropy(torch.tensor([1.0, 3.0])) if weighted else None
        ClassificationTrainer(model=model, args=args, train_dataset=rows, compute_loss_func=loss,
                              lm_loss_weight=lm_loss_weight).train()
        # .cpu(): on a machine with a GPU, Trainer moved the model there
        updates.append({name: weight.detach().cpu() - reference.state_dict()[name]
                        for name, weight in model.state_dict().items()})
    assert updates[0]["score.weight"].abs().max() > 0
    torch.testing.assert_close(updates[1], updates[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("class_weights", [None, torch.tensor([1.0, 3.0])])
def test_lm_loss_weight_adds_the_causal_lm_loss_in_training_only(class_weights, tmp_path):
    """--lm_loss_weight w: training loss = classification loss + w * the loss the causal LM with these weights gives
    the same padded batch (padding ignored); evaluation reports the classification loss alone."""
    from transformers import TrainingArguments

    from hfgpt.training.classification import ClassificationTrainer

    torch.manual_seed(0)
    config = HFGPTConfig.from_preset("tiny", num_labels=2, pad_token_id=1)
    classifier = HFGPTForSequenceClassification(config)
    causal_lm = HFGPTForCausalLM(config)
    causal_lm.load_state_dict(classifier.state_dict(), strict=False)  # the shared blocks; lm_head is tied to wte
    input_ids = torch.randint(2, 512, (3, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 4:] = 0
    attention_mask[2, 6:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 1)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([0, 1, 1])}
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    losses = {}
    loss_function = None if class_weights is None else WeightedCrossEntropy(class_weights)
    for weight in (0.0, 0.5):
        trainer = ClassificationTrainer(model=classifier, args=args, lm_loss_weight=weight,
                                        compute_loss_func=loss_function)
        with torch.no_grad():
            classifier.train()
            losses[weight] = trainer.compute_loss(classifier, dict(inputs)).item()
            classifier.eval()
            losses[weight, "eval"] = trainer.compute_loss(classifier, dict(inputs)).item()
    with torch.no_grad():
        causal_lm.train()  # the tiny preset has no dropout: train and eval give the same numbers
        lm_loss = causal_lm(input_ids, attention_mask=attention_mask,
                            labels=input_ids.masked_fill(attention_mask == 0, -100)).loss.item()
    assert lm_loss > 1
    assert losses[0.5] == pytest.approx(losses[0.0] + 0.5 * lm_loss, rel=1e-5)
    assert losses[0.5, "eval"] == pytest.approx(losses[0.0, "eval"]) == pytest.approx(losses[0.0])


# --- hfgpt classify ---------------------------------------------------------------------------------------------------


def test_classify_full_end_to_end(base_dir, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hfgpt.evaluation.cli import predict_classes

    train = _write_rows(tmp_path / "train.tsv", _toy_rows(120))
    validation = _write_rows(tmp_path / "validation.tsv", _toy_rows(24, seed=1))
    out = tmp_path / "out"
    arguments = ["--model_name_or_path", base_dir, "--train_file", str(train), "--validation_file", str(validation),
                 "--output_dir", str(out), "--num_train_epochs", "3", "--learning_rate", "2e-3",
                 "--per_device_train_batch_size", "8", "--class_weights", "balanced", "--logging_steps", "5",
                 "--classifier_pooling", "mean"]
    assert _run(arguments) == 0

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.classifier_pooling == "mean"
    assert model.config.id2label == {0: "ham", 1: "spam"} and model.config.label2id == {"ham": 0, "spam": 1}
    results = json.loads((out / "eval_results.json").read_text())["classification"]
    assert results["label_names"] == ["ham", "spam"] and results["num_examples"] == 24
    assert sum(map(sum, results["confusion_matrix"])) == 24
    assert results["accuracy"] >= 0.9, results  # the words give the class away: a working run learns them
    # the saved model reproduces the reported accuracy
    tokenizer = AutoTokenizer.from_pretrained(out)
    rows = [line.split("\t") for line in validation.read_text().splitlines()[1:]]
    predictions = predict_classes(model.eval(), tokenizer, [text for _, text in rows], progress=False)
    accuracy = sum(model.config.id2label[p] == label for p, (label, _) in zip(predictions, rows)) / len(rows)
    assert accuracy == pytest.approx(results["accuracy"])
    # every validation text, in file order, with its label, prediction and class probabilities
    predicted = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(row["label"], row["text"]) for row in predicted] == [(label, text) for label, text in rows]
    assert [row["prediction"] for row in predicted] == [model.config.id2label[p] for p in predictions]
    assert all(row["correct"] == (row["label"] == row["prediction"]) for row in predicted)
    assert all(sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-4) for row in predicted)
    assert sum(row["correct"] for row in predicted) / len(rows) == pytest.approx(results["accuracy"])

    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["method"] == "full" and summary["class_weights"] == "balanced"
    assert summary["parameters"]["trainable"] == summary["parameters"]["total"]
    assert summary["memory"]["peak_rss_bytes"] > 0
    # tokens/s and MFU (issue #25), counted from tokenizer-padded batches (BatchEncodings, not dicts)
    assert summary["speed"]["tokens_per_second"] > 0 and summary["speed"]["training_tokens_this_session"] > 0
    # the same command again: refused as an earlier run of the same model, not as "a different model"
    capsys.readouterr()
    assert _run(arguments) == 1
    err = capsys.readouterr().err
    assert "already holds a trained model from an earlier run" in err and "different model" not in err, err
    # the training file is recorded (name, size, hash: no path), so that evaluating on it is caught
    assert summary["training_data_files"] == [files.fingerprint(train)]
    assert hfgpt_main(["eval", "classification", "--model_name_or_path", str(out), "--file", str(train)]) == 1
    assert hfgpt_main(["eval", "classification", "--model_name_or_path", str(out), "--file", str(validation)]) == 0
    assert json.loads((out / "eval_results.json").read_text())["classification"]["accuracy"] == results["accuracy"]
    # accuracy, precision, recall and F1 at every epoch
    history = json.loads((out / "log_history.json").read_text())
    per_epoch = [entry for entry in history if "eval_f1" in entry and "eval_recall" in entry]
    assert len(per_epoch) >= 3
    training_logs = [entry for entry in history if "loss" in entry]
    assert training_logs and all(entry["tokens_per_second"] > 0 and entry["mfu"] > 0 for entry in training_logs)
    for name in ("README.md", "loss_curve.png", "model.safetensors"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin"))  # no pickles in the model directory


def test_texts_start_with_bos_as_pretraining_documents_do(base_dir, tmp_path):
    from transformers import AutoTokenizer

    from hfgpt.data.text import set_text_start_bos

    train = _write_rows(tmp_path / "train.tsv", _toy_rows(40))
    for flag, expect_bos in ((["--add_bos_token", "false"], False), ([], True)):
        out = tmp_path / f"out{len(flag)}"
        assert _run(["--model_name_or_path", base_dir, "--train_file", str(train), "--output_dir", str(out),
                     "--max_steps", "1", *flag]) == 0
        tokenizer = AutoTokenizer.from_pretrained(out)  # what pipelines and hfgpt eval classification will use
        ids = tokenizer("see you at lunch")["input_ids"]
        assert (ids[0] == tokenizer.bos_token_id) == expect_bos, ids
        summary = json.loads((out / "training_summary.json").read_text())
        assert summary["add_bos_token"] == expect_bos
    set_text_start_bos(tokenizer, True)  # already adds it: not twice
    assert tokenizer("see you at lunch")["input_ids"] == ids


def test_classify_qlora_end_to_end(base_dir, tmp_path):
    """QLoRA with gradient checkpointing and the auxiliary LM loss: the adapter path of every classify option."""
    from peft import PeftConfig
    from transformers import AutoModelForSequenceClassification

    train = _write_rows(tmp_path / "train.csv", _toy_rows(60))
    out = tmp_path / "out"
    assert _run(["--model_name_or_path", base_dir, "--train_file", str(train), "--validation_split_percentage", "20",
                 "--output_dir", str(out), "--num_train_epochs", "1", "--learning_rate", "3e-3", "--qlora",
                 "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj", "--gradient_checkpointing", "true",
                 "--lm_loss_weight", "0.5"]) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["method"] == "qlora" and summary["lora"]["r"] == 4 and summary["lm_loss_weight"] == 0.5
    assert summary["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert summary["parameters"]["trainable"] < summary["parameters"]["total"] / 5
    assert summary["memory"]["linear_ratio_to_fp32"] < 0.35
    assert "merged_accuracy" in summary["final_metrics"]
    predicted = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predicted) == 12  # 20% of 60 rows
    assert sum(row["correct"] for row in predicted) / 12 == pytest.approx(summary["final_metrics"]["merged_accuracy"])
    # the adapter names a base of its own: the classifier's config (its labels) over base_dir's weights
    adapter_base = PeftConfig.from_pretrained(out / "adapter").base_model_name_or_path
    assert adapter_base == str((out / "adapter" / "base").resolve())
    assert json.loads((out / "adapter" / "base" / "config.json").read_text())["id2label"] == {"0": "ham", "1": "spam"}
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert merged.config.id2label == {0: "ham", 1: "spam"}
    assert merged.transformer.h[0].attn.q_proj.weight.dtype == torch.float32


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora", "--lora_target_modules", "c_attn"], "'c_attn' matches no linear layer.*q_proj, k_proj"),
        (["--label_column", "category"], "no column 'category'; its columns are 'label', 'text'"),
        (["--train_last_n_blocks", "5"], "the model has 2 blocks"),
        (["--lora", "--train_last_n_blocks", "1"], "pick one"),
        (["--class_weights", "1,2,3"], "need 2 positive numbers"),
        (["--lm_loss_weight", "-1"], "--lm_loss_weight must be 0 \\(off\\) or positive"),
        (["--classifier_pooling", "max"], "classifier_pooling='max' is not supported; choose one of 'last', 'mean'"),
    ],
)
def test_classify_bad_input_is_a_clear_error(base_dir, tmp_path, capsys, extra, message):
    train = _write_rows(tmp_path / "train.tsv", _toy_rows(20))
    code = _run(["--model_name_or_path", base_dir, "--train_file", str(train), "--output_dir", str(tmp_path / "out"),
                 *extra])
    err = capsys.readouterr().err
    assert code == 1 and re.search(message, err), err


def test_lm_loss_weight_needs_tied_embeddings(tiny_tokenizer, tmp_path, capsys):
    config = HFGPTConfig.from_preset("tiny", pad_token_id=tiny_tokenizer.pad_token_id, tie_word_embeddings=False)
    HFGPTForCausalLM(config).save_pretrained(tmp_path / "untied")
    tiny_tokenizer.save_pretrained(tmp_path / "untied")
    train = _write_rows(tmp_path / "train.tsv", _toy_rows(20))
    assert _run(["--model_name_or_path", str(tmp_path / "untied"), "--train_file", str(train),
                 "--output_dir", str(tmp_path / "out"), "--lm_loss_weight", "0.5"]) == 1
    assert "needs a model with tied embeddings" in capsys.readouterr().err


def test_classify_unknown_validation_label_is_a_clear_error(base_dir, tmp_path, capsys):
    train = _write_rows(tmp_path / "train.tsv", _toy_rows(20))
    validation = _write_rows(tmp_path / "validation.tsv", [("ham", "ok"), ("phishing", "click here")])
    assert _run(["--model_name_or_path", base_dir, "--train_file", str(train), "--validation_file", str(validation),
                 "--output_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "'phishing'" in err and "'ham', 'spam'" in err

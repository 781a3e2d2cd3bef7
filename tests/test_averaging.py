"""Model soups: `average_models` / `hfgpt average` average the weights of models of one architecture."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hfgpt import HFGPTConfig, HFGPTForCausalLM, HFGPTForSequenceClassification
from hfgpt.cli import main as hfgpt_main
from hfgpt.files import TRAINING_SUMMARY, read_json
from hfgpt.training.averaging import average_models

LABELS = {"id2label": {0: "ham", 1: "spam"}, "label2id": {"ham": 0, "spam": 1}}


def _classifier_dir(path, seed, tokenizer, **overrides):
    torch.manual_seed(seed)
    config = HFGPTConfig.from_preset("tiny", num_labels=2, pad_token_id=tokenizer.pad_token_id, **LABELS, **overrides)
    model = HFGPTForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_the_soup_is_the_mean_of_the_weights_and_a_complete_model_dir(tmp_path, tiny_tokenizer):
    models = [_classifier_dir(tmp_path / f"run{seed}", seed, tiny_tokenizer) for seed in (0, 1, 2)]
    soup = average_models([tmp_path / f"run{seed}" for seed in (0, 1, 2)], tmp_path / "soup")

    for name, weight in soup.state_dict().items():
        expected = torch.stack([model.state_dict()[name] for model in models]).mean(0)
        torch.testing.assert_close(weight, expected, msg=name)
    assert not torch.equal(soup.score.weight, models[0].score.weight)  # (three different models went in)

    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "soup").eval()
    assert loaded.config.id2label == {0: "ham", 1: "spam"}
    assert AutoTokenizer.from_pretrained(tmp_path / "soup").chat_template == tiny_tokenizer.chat_template
    torch.testing.assert_close(loaded.score.weight, soup.score.weight)
    summary = read_json(tmp_path / "soup" / TRAINING_SUMMARY)
    assert len(summary["weight_average"]["models"]) == 3
    assert (tmp_path / "soup" / "README.md").is_file()


def test_a_soup_of_one_model_twice_predicts_as_that_model(tmp_path, tiny_tokenizer):
    model = _classifier_dir(tmp_path / "run", 0, tiny_tokenizer).eval()
    soup = average_models([tmp_path / "run", tmp_path / "run"]).eval()
    input_ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(soup(input_ids).logits, model(input_ids).logits)


def test_a_causal_lm_soup_keeps_its_tied_embeddings(tmp_path, tiny_tokenizer):
    for seed in (0, 1):
        torch.manual_seed(seed)
        HFGPTForCausalLM(HFGPTConfig.from_preset("tiny")).save_pretrained(tmp_path / f"lm{seed}")
    soup = average_models([tmp_path / "lm0", tmp_path / "lm1"])
    assert isinstance(soup, HFGPTForCausalLM)
    assert soup.lm_head.weight.data_ptr() == soup.transformer.wte.weight.data_ptr()


def test_models_of_different_shapes_are_a_clear_error(tmp_path, tiny_tokenizer):
    _classifier_dir(tmp_path / "a", 0, tiny_tokenizer)
    _classifier_dir(tmp_path / "b", 0, tiny_tokenizer, hidden_size=32, num_attention_heads=2)
    with pytest.raises(ValueError, match="one architecture.*hidden_size"):
        average_models([tmp_path / "a", tmp_path / "b"])
    torch.manual_seed(0)
    HFGPTForCausalLM(HFGPTConfig.from_preset("tiny")).save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="architectures"):
        average_models([tmp_path / "a", tmp_path / "lm"])


def test_bad_ingredients_are_clear_errors(tmp_path, tiny_tokenizer):
    _classifier_dir(tmp_path / "a", 0, tiny_tokenizer)
    with pytest.raises(ValueError, match="at least two"):
        average_models([tmp_path / "a"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        average_models([tmp_path / "a", tmp_path / "empty"])


def test_hfgpt_average_command(tmp_path, tiny_tokenizer, capsys):
    for seed in (0, 1):
        _classifier_dir(tmp_path / f"run{seed}", seed, tiny_tokenizer)
    argv = ["average", "--model_dirs", str(tmp_path / "run0"), str(tmp_path / "run1"), "--output_dir",
            str(tmp_path / "soup")]
    assert hfgpt_main(argv) == 0
    assert (tmp_path / "soup" / "model.safetensors").is_file()
    with pytest.raises(SystemExit):  # an existing model is not overwritten silently
        hfgpt_main(argv)
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert hfgpt_main([*argv, "--overwrite_output_dir"]) == 0
    assert hfgpt_main(["average", "--model_dirs", str(tmp_path / "run0"), str(tmp_path / "nothing"),
                       "--output_dir", str(tmp_path / "x")]) == 2

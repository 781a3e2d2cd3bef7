"""Messages a user cannot act on stay out of the output (hfgpt/quiet.py); everything else still shows."""

import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, TrainingArguments
from transformers.utils import logging as transformers_logging

import hfgpt
from hfgpt import HFGPTConfig, HFGPTForCausalLM, quiet
from hfgpt.training.peft import load_base_model


@pytest.fixture
def transformers_warnings():
    """The tests run transformers at verbosity 'error' (conftest); these look at what a user sees: 'warning'."""
    before = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_warning()
    yield
    transformers_logging.set_verbosity(before)


@pytest.fixture
def causal_lm_dir(tmp_path):
    torch.manual_seed(0)
    model = HFGPTForCausalLM(HFGPTConfig.from_preset("tiny", vocab_size=64))
    model.save_pretrained(tmp_path / "lm")
    return tmp_path / "lm"


def test_a_classifier_from_a_causal_lm_reports_its_new_head_in_one_line(causal_lm_dir, transformers_warnings, capsys,
                                                                        caplog):
    load_base_model(causal_lm_dir, AutoModelForSequenceClassification, num_labels=2)
    assert "New head: score.weight initialised at random" in capsys.readouterr().out
    assert "LOAD REPORT" not in caplog.text


def test_any_other_load_finding_still_shows_the_report_without_terminal_codes(causal_lm_dir, transformers_warnings,
                                                                            capsys, caplog):
    weights = load_file(causal_lm_dir / "model.safetensors")
    dropped = next(name for name in weights if ".h.1." in name or ".layers.1." in name)
    del weights[dropped]
    save_file(weights, causal_lm_dir / "model.safetensors", metadata={"format": "pt"})
    load_base_model(causal_lm_dir, AutoModelForSequenceClassification, num_labels=2)
    assert "LOAD REPORT" in caplog.text and dropped in caplog.text
    assert "New head" not in capsys.readouterr().out
    assert "\x1b[" not in caplog.text


def test_the_load_report_loses_its_terminal_codes_everywhere():
    record = logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1,
                               "\x1b[1mHFGPTModel LOAD REPORT\x1b[0m from: x\nKey | Status", None, None)
    assert logging.getLogger("transformers.modeling_utils").filter(record)
    assert record.getMessage() == "HFGPTModel LOAD REPORT from: x\nKey | Status"


def test_checkpoint_ordering_notice_is_dropped_and_other_messages_are_not():
    logger = logging.getLogger("transformers.trainer_utils")

    def shown(message):
        return bool(logger.filter(logging.LogRecord(logger.name, logging.WARNING, __file__, 1, message, None, None)))

    assert not shown("mtime may not be reliable on this filesystem, falling back to numerical ordering")
    assert shown("Checkpoint destination directory out/x already exists and is non-empty.")


def test_save_and_load_bars_wait_before_they_draw_and_other_bars_do_not():
    with transformers_logging.tqdm(range(1), desc="Writing model shards", disable=False) as bar:
        assert bar.delay == quiet.QUICK_BAR_DELAY_SECONDS
    with transformers_logging.tqdm(range(1), desc="Loading weights", disable=False) as bar:
        assert bar.delay == quiet.QUICK_BAR_DELAY_SECONDS
    with transformers_logging.tqdm(range(1), desc="Tokenizing", disable=False) as bar:
        assert bar.delay == 0


def test_a_tiny_save_draws_no_progress_bar(causal_lm_dir, tmp_path, transformers_warnings, capfd):
    HFGPTForCausalLM.from_pretrained(causal_lm_dir).save_pretrained(tmp_path / "again")
    out, err = capfd.readouterr()
    assert "Writing model shards" not in out + err
    assert "Loading weights" not in out + err


def test_trl_configs_default_to_checkpointing_without_a_deprecation_warning(tmp_path):
    from hfgpt.training.alignment import HFGPTDPOConfig, HFGPTSFTConfig

    for config_class in (HFGPTSFTConfig, HFGPTDPOConfig):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = config_class(output_dir=str(tmp_path), report_to=[])
        assert config.activation_checkpointing and config.gradient_checkpointing  # TRL's default, kept
        assert not [w for w in caught if "gradient_checkpointing" in str(w.message)], config_class
        off = config_class(output_dir=str(tmp_path), report_to=[], gradient_checkpointing=False)
        assert not off.activation_checkpointing  # the old name still turns it off


def test_renamed_method_warnings_from_trl_are_dropped_but_the_user_facing_one_is_kept(tmp_path):
    model = HFGPTForCausalLM(HFGPTConfig.from_preset("tiny", vocab_size=64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        hfgpt.quiet.install()
        warnings.filterwarnings("always", append=True)  # behind hfgpt's filter, not in front of it
        model.gradient_checkpointing_enable()
        assert model.is_gradient_checkpointing
        model.gradient_checkpointing_disable()
        TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=True, report_to=[])
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not [m for m in messages if "_enable" in m or "_disable" in m or "is_gradient" in m], messages
    assert any(m.startswith("`gradient_checkpointing` is deprecated") for m in messages), messages

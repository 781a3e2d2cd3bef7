import json

import pytest
import torch
from transformers import AutoConfig

from hfgpt import HFGPTConfig, HFGPTForCausalLM
from hfgpt.configuration_hfgpt import PRESETS


def test_standard_and_gpt2_names_are_the_same_attributes():
    config = HFGPTConfig(n_embd=96, n_layer=3, n_head=6, n_positions=64, n_inner=200, vocab_size=100)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (96, 3, 6)
    assert (config.max_position_embeddings, config.intermediate_size) == (64, 200)
    assert config.n_embd == 96 and config.n_layer == 3 and config.n_head == 6 and config.n_positions == 64
    assert config.num_key_value_heads == 6  # defaults to multi-head attention
    config.n_embd = 48
    assert config.hidden_size == 48


def test_round_trip_keeps_every_switch(tmp_path):
    config = HFGPTConfig.from_preset("modern-tiny", rope_theta=500.0, norm_position="post", residual_dropout=0.1)
    config.save_pretrained(tmp_path)
    loaded = HFGPTConfig.from_pretrained(tmp_path)
    for name in ("position_embedding_type", "rope_theta", "rope_parameters", "norm_type", "norm_position",
                 "hidden_act", "num_key_value_heads", "bias", "residual_dropout", "intermediate_size",
                 "tie_word_embeddings"):
        assert getattr(loaded, name) == getattr(config, name), name
    assert loaded.rope_parameters == {"rope_type": "default", "rope_theta": 500.0}
    assert set(loaded.auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM",
                                    "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                                    "AutoModelForQuestionAnswering"}


def test_rope_scaling_is_transformers_rope_parameters(tmp_path):
    config = HFGPTConfig.from_preset("modern-tiny", rope_parameters={"rope_type": "yarn", "factor": 4.0})
    # completed as transformers completes it: the default theta, the trained context YaRN scales from
    assert config.rope_parameters == {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                      "original_max_position_embeddings": 128}
    config.save_pretrained(tmp_path)
    assert HFGPTConfig.from_pretrained(tmp_path).rope_parameters == config.rope_parameters
    # older spellings: rope_theta beside the dict, and transformers' rope_scaling
    assert HFGPTConfig.from_preset("modern-tiny", rope_theta=500).rope_parameters == {"rope_type": "default",
                                                                                       "rope_theta": 500.0}
    legacy = HFGPTConfig.from_preset("modern-tiny", rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0})
    assert legacy.rope_parameters["rope_type"] == "linear" and legacy.rope_theta == 500.0


def test_configs_saved_before_rope_parameters_still_load(tmp_path):
    # config.json of earlier hfgpt versions: rope_theta as a field of its own, the four entries of auto_map then
    HFGPTConfig.from_preset("modern-tiny").save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    stored["rope_theta"] = stored.pop("rope_parameters")["rope_theta"] / 20
    stored["auto_map"] = {k: v for k, v in stored["auto_map"].items() if "Token" not in k and "Question" not in k}
    (tmp_path / "config.json").write_text(json.dumps(stored))
    loaded = HFGPTConfig.from_pretrained(tmp_path)
    assert loaded.rope_parameters == {"rope_type": "default", "rope_theta": 500.0} and loaded.rope_theta == 500.0
    # and gain the heads added since, so that trust_remote_code finds them once saved again
    assert loaded.auto_map["AutoModelForTokenClassification"] == "modeling_hfgpt.HFGPTForTokenClassification"
    assert loaded.auto_map["AutoModelForQuestionAnswering"] == "modeling_hfgpt.HFGPTForQuestionAnswering"


def test_presets():
    assert {"tiny", "gpt2", "gpt2-medium", "modern"} <= set(HFGPTConfig.presets())
    gpt2 = HFGPTConfig.from_preset("gpt2")
    assert (gpt2.hidden_size, gpt2.num_hidden_layers, gpt2.num_attention_heads, gpt2.vocab_size) == (768, 12, 12, 50257)
    medium = HFGPTConfig.from_preset("gpt2-medium")
    assert (medium.hidden_size, medium.num_hidden_layers, medium.num_attention_heads) == (1024, 24, 16)
    modern = HFGPTConfig.from_preset("modern")
    assert modern.position_embedding_type == "rope" and modern.norm_type == "rmsnorm"
    assert modern.hidden_act == "swiglu" and modern.num_key_value_heads < modern.num_attention_heads
    assert HFGPTConfig.from_preset("tiny", hidden_size=32).hidden_size == 32
    with pytest.raises(ValueError, match="Unknown preset 'gpt5'.*tiny"):
        HFGPTConfig.from_preset("gpt5")


def test_gpt2_preset_has_124m_parameters():
    with torch.device("meta"):
        model = HFGPTForCausalLM(HFGPTConfig.from_preset("gpt2"))
    unique = sum(p.numel() for p in model.parameters())  # the tied lm_head is counted once
    assert round(unique / 1e6) == 124


def test_swiglu_default_width_keeps_the_mlp_parameter_count():
    gelu = HFGPTConfig(hidden_size=768, hidden_act="gelu")
    swiglu = HFGPTConfig(hidden_size=768, hidden_act="swiglu")
    assert gelu.intermediate_size == 3072
    assert swiglu.intermediate_size % 64 == 0
    assert abs(3 * swiglu.intermediate_size - 2 * gelu.intermediate_size) / (2 * gelu.intermediate_size) < 0.03


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(position_embedding_type="alibi"), r"position_embedding_type='alibi'.*'learned', 'sinusoidal', 'rope'"),
        (dict(norm_type="batchnorm"), r"norm_type='batchnorm'.*'layernorm', 'rmsnorm'"),
        (dict(norm_position="sandwich"), r"norm_position='sandwich'.*'pre', 'post'"),
        (dict(hidden_act="tanh"), r"hidden_act='tanh'.*'swiglu'"),
        (dict(hidden_size=100, num_attention_heads=12), r"hidden_size=100 is not divisible by num_attention_heads=12"),
        (dict(num_attention_heads=4, num_key_value_heads=3), r"num_attention_heads=4 is not divisible by num_key_va"),
        (dict(attention_dropout=1.5), r"attention_dropout=1.5 must be a probability"),
        (dict(num_hidden_layers=0), r"num_hidden_layers=0 must be a positive integer"),
        (dict(hidden_size=12, num_attention_heads=4, position_embedding_type="rope"), r"even head_dim"),
        (dict(rope_theta=-1.0), r"rope_theta=-1.0 must be a positive number"),
        (dict(position_embedding_type="rope", rope_parameters={"rope_type": "ntk"}),
         r"rope_type'\]='ntk' is not supported; choose one of 'default', 'linear', 'dynamic', 'yarn', 'llama3'"),
        (dict(position_embedding_type="rope", rope_parameters={"rope_type": "linear"}), r"needs 'factor'"),
        (dict(position_embedding_type="rope", rope_parameters={"rope_type": "llama3", "factor": 8.0}),
         r"needs 'low_freq_factor', 'high_freq_factor'"),
        (dict(position_embedding_type="rope", rope_parameters={"rope_type": "linear", "factor": 0.5}),
         r"factor=0.5 must be a number >= 1"),
        (dict(position_embedding_type="rope", rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                                              "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
         r"low_freq_factor=4.0 must be below high_freq_factor=1.0"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}),
         r"scales rotary positions, but this model has position_embedding_type='learned'"),
    ],
)
def test_bad_values_are_rejected_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        HFGPTConfig.from_preset("tiny", **overrides)


def test_from_pretrained_overrides_are_validated(tmp_path):
    # from_pretrained sets keyword overrides after __init__ has validated the stored config
    HFGPTConfig.from_preset("tiny").save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path, norm_type="rmsnorm").norm_type == "rmsnorm"
    with pytest.raises(ValueError, match=r"norm_type='batchnorm'.*'layernorm', 'rmsnorm'"):
        AutoConfig.from_pretrained(tmp_path, norm_type="batchnorm")
    with pytest.raises(ValueError, match=r"hidden_size=66 is not divisible by num_attention_heads=4"):
        HFGPTConfig.from_pretrained(tmp_path, hidden_size=66)
    with pytest.raises(ValueError, match=r"scales rotary positions"):
        HFGPTConfig.from_pretrained(tmp_path, rope_parameters={"rope_type": "linear", "factor": 2.0})


def test_every_preset_is_valid():
    for name in PRESETS:
        HFGPTConfig.from_preset(name)


def test_an_older_transformers_gets_a_clear_error_naming_the_version_needed(monkeypatch):
    # the config file is what trust_remote_code imports first, so its check guards the shipped modelling code too
    import runpy

    import transformers

    import hfgpt.configuration_hfgpt as configuration

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(ImportError, match=r"transformers >= 5\.24.*5\.17\.0.*pip install -U"):
        runpy.run_path(configuration.__file__)


def test_the_transformers_floor_matches_the_package_pin():
    import re
    import tomllib
    from pathlib import Path

    from hfgpt.configuration_hfgpt import MIN_TRANSFORMERS_VERSION

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    pin = next(d for d in pyproject["project"]["dependencies"] if re.match(r"transformers\b", d))
    assert f">={MIN_TRANSFORMERS_VERSION}" in pin, pin

"""GPT-2 <-> hfgpt conversion: a random GPT-2 built here converts to hfgpt with the same logits (with and without a
cache, in generate too), converts back to identical weights, and everything neither side can express is refused."""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from hfgpt import HFGPTConfig, HFGPTForCausalLM
from hfgpt.cli import main as hfgpt_main
from hfgpt.convert import gpt2_to_hfgpt, hfgpt_to_gpt2
from hfgpt.convert.gpt2 import gpt2_config_from_hfgpt, hfgpt_config_from_gpt2

ATOL = 1e-4
VOCAB = 512
SMALL_GPT2 = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter away from its initial value (LayerNorm weights off 1, biases off 0, larger matrices), so
    that a swapped, untransposed or misordered tensor changes the logits visibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained here (nothing downloaded); <|endoftext|> is id 0, GPT-2's bos/eos/pad role."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def save_gpt2(path, with_tokenizer: bool = True, **overrides):
    torch.manual_seed(0)
    model = perturb_(GPT2LMHeadModel(GPT2Config(**{**SMALL_GPT2, **overrides})))
    model.save_pretrained(path)
    if with_tokenizer:
        make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_gpt2(tmp_path_factory.mktemp("gpt2") / "gpt2")


@pytest.fixture(scope="module")
def converted_dir(gpt2_dir, tmp_path_factory):
    return gpt2_to_hfgpt(gpt2_dir, tmp_path_factory.mktemp("converted") / "hfgpt")


def load_pair(gpt2_path, hfgpt_path):
    gpt2 = AutoModelForCausalLM.from_pretrained(gpt2_path, attn_implementation="sdpa").eval()
    hfgpt = AutoModelForCausalLM.from_pretrained(hfgpt_path, attn_implementation="sdpa").eval()
    assert isinstance(gpt2, GPT2LMHeadModel) and isinstance(hfgpt, HFGPTForCausalLM)
    return gpt2, hfgpt


def random_batch(batch=3, length=40, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length // 2:] = 0  # a right-padded row: padding must be masked the same way by both
    return input_ids, attention_mask


def assert_same_logits(gpt2, hfgpt, **inputs):
    with torch.no_grad():
        expected, actual = gpt2(**inputs).logits, hfgpt(**inputs).logits
    assert expected.abs().max() > 1.0  # the models are far from uniform: a wrong tensor would show
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Same function


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"activation_function": "gelu", "tie_word_embeddings": False, "n_inner": 96},
        {"activation_function": "relu", "layer_norm_epsilon": 1e-6},
        {"activation_function": "gelu_pytorch_tanh"},
    ],
    ids=["gpt2-default", "gelu-untied-n_inner", "relu-eps", "gelu_pytorch_tanh"],
)
def test_converted_logits_match_gpt2_both_ways(tmp_path, overrides):
    gpt2_path = save_gpt2(tmp_path / "gpt2", with_tokenizer=False, **overrides)
    hfgpt_path = gpt2_to_hfgpt(gpt2_path, tmp_path / "hfgpt")
    gpt2, hfgpt = load_pair(gpt2_path, hfgpt_path)
    assert hfgpt.config.tie_word_embeddings == gpt2.config.tie_word_embeddings
    assert (hfgpt.lm_head.weight is hfgpt.transformer.wte.weight) == gpt2.config.tie_word_embeddings
    input_ids, attention_mask = random_batch()
    assert_same_logits(gpt2, hfgpt, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    # and back: the GPT-2 we get is the one we started from, tensor for tensor
    back_path = hfgpt_to_gpt2(hfgpt_path, tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(back_path).eval()
    assert isinstance(back, GPT2LMHeadModel)
    original, returned = gpt2.state_dict(), back.state_dict()
    assert original.keys() == returned.keys()
    for name in original:
        assert torch.equal(original[name], returned[name]), name
    assert_same_logits(gpt2, back, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def test_native_hfgpt_converts_to_gpt2_with_same_logits(tmp_path):
    torch.manual_seed(0)
    hfgpt = perturb_(HFGPTForCausalLM(HFGPTConfig.from_preset("tiny", hidden_act="relu", intermediate_size=128)))
    hfgpt.save_pretrained(tmp_path / "hfgpt")
    gpt2_path = hfgpt_to_gpt2(tmp_path / "hfgpt", tmp_path / "gpt2")
    gpt2 = AutoModelForCausalLM.from_pretrained(gpt2_path, attn_implementation="sdpa").eval()
    assert isinstance(gpt2, GPT2LMHeadModel)
    assert gpt2.config.activation_function == "relu" and gpt2.config.n_inner == 128
    input_ids, attention_mask = random_batch()
    assert_same_logits(gpt2, hfgpt, input_ids=input_ids, attention_mask=attention_mask)


def test_step_by_step_greedy_decode_with_cache_matches(gpt2_dir, converted_dir):
    gpt2, hfgpt = load_pair(gpt2_dir, converted_dir)
    models = {"gpt2": gpt2, "hfgpt": hfgpt}
    prompt, _ = random_batch(batch=2, length=12, seed=2)
    caches = {name: DynamicCache(config=model.config) for name, model in models.items()}
    tokens = {name: prompt for name in models}
    step_logits = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(20):
            for name, model in models.items():
                new_tokens = tokens[name][:, caches[name].get_seq_length():]  # the whole prompt, then one token
                logits = model(input_ids=new_tokens, cache=caches[name], use_cache=True).logits[:, -1]
                step_logits[name].append(logits)
                tokens[name] = torch.cat([tokens[name], logits.argmax(-1, keepdim=True)], dim=1)
            torch.testing.assert_close(step_logits["hfgpt"][-1], step_logits["gpt2"][-1], atol=ATOL, rtol=0)
        assert torch.equal(tokens["hfgpt"], tokens["gpt2"])
        # the cached decode agrees with one uncached pass over the whole sequence
        uncached = hfgpt(input_ids=tokens["hfgpt"][:, :-1], use_cache=False).logits[:, prompt.shape[1] - 1:]
    torch.testing.assert_close(torch.stack(step_logits["hfgpt"], dim=1), uncached, atol=ATOL, rtol=0)


def test_generate_with_cache_matches_gpt2(gpt2_dir, converted_dir):
    gpt2, hfgpt = load_pair(gpt2_dir, converted_dir)
    prompt, _ = random_batch(batch=2, length=10, seed=3)
    settings = dict(max_new_tokens=30, do_sample=False, use_cache=True, return_dict_in_generate=True,
                    output_logits=True, pad_token_id=0, eos_token_id=None)
    expected, actual = gpt2.generate(prompt, **settings), hfgpt.generate(prompt, **settings)
    assert actual.sequences.shape == (2, 40)
    assert torch.equal(actual.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(actual.logits), torch.stack(expected.logits), atol=ATOL, rtol=0)
    without_cache = hfgpt.generate(prompt, **{**settings, "use_cache": False})
    assert torch.equal(without_cache.sequences, expected.sequences)


# ---------------------------------------------------------------------------------------------------------------------
# The converted directory


def test_converted_directory_is_a_complete_hfgpt_directory(gpt2_dir, converted_dir):
    names = {path.name for path in converted_dir.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_hfgpt.py", "modeling_hfgpt.py"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in names)
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["model_type"] == "hfgpt"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hfgpt.HFGPTForCausalLM"
    assert config["position_embedding_type"] == "learned" and config["hidden_act"] == "gelu_new"
    assert config["residual_dropout"] == 0.1  # GPT-2's resid_pdrop default carried over, not hfgpt's 0.0
    assert not any(path.name.startswith(".") for path in converted_dir.parent.iterdir())  # no partial directory left

    source_tokenizer, tokenizer = AutoTokenizer.from_pretrained(gpt2_dir), AutoTokenizer.from_pretrained(converted_dir)
    text = "the lazy fox jumps"
    assert tokenizer(text).input_ids == source_tokenizer(text).input_ids
    assert len(tokenizer(text).input_ids) > 1


def test_cli_converts_both_ways(gpt2_dir, tmp_path, capsys):
    assert hfgpt_main(["convert", "--from", "gpt2", str(gpt2_dir), str(tmp_path / "hfgpt")]) == 0
    assert hfgpt_main(["convert", "--from", "hfgpt", str(tmp_path / "hfgpt"), str(tmp_path / "gpt2")]) == 0
    assert "Converted" in capsys.readouterr().out
    gpt2, hfgpt = load_pair(tmp_path / "gpt2", tmp_path / "hfgpt")
    assert_same_logits(gpt2, hfgpt, input_ids=random_batch()[0])

    assert hfgpt_main(["convert", "--from", "gpt2", str(tmp_path / "hfgpt"), str(tmp_path / "again")]) == 1
    error = capsys.readouterr().err
    assert "'hfgpt' model" in error and "--from hfgpt" in error
    assert not (tmp_path / "again").exists()


# ---------------------------------------------------------------------------------------------------------------------
# What cannot be converted is refused, by name


@pytest.mark.parametrize(
    "option",
    [
        {"scale_attn_by_inverse_layer_idx": True},
        {"reorder_and_upcast_attn": True},
        {"scale_attn_weights": False},
        {"add_cross_attention": True},
    ],
    ids=lambda option: next(iter(option)),
)
def test_gpt2_options_hfgpt_lacks_are_refused(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        hfgpt_config_from_gpt2(GPT2Config(**SMALL_GPT2, **option))


def test_unsupported_gpt2_activation_is_refused_before_writing(tmp_path):
    gpt2_path = save_gpt2(tmp_path / "gpt2", with_tokenizer=False, activation_function="silu")
    with pytest.raises(ValueError, match=r"activation_function='silu'.*'gelu_new'"):
        gpt2_to_hfgpt(gpt2_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "switch",
    [
        {"position_embedding_type": "rope"},
        {"position_embedding_type": "sinusoidal"},
        {"norm_type": "rmsnorm"},
        {"norm_position": "post"},
        {"bias": False},
        {"num_key_value_heads": 2},
        {"hidden_act": "swiglu"},
    ],
    ids=lambda switch: "-".join(map(str, next(iter(switch.items())))),
)
def test_hfgpt_switches_gpt2_lacks_are_refused(switch):
    with pytest.raises(ValueError, match=next(iter(switch))):
        gpt2_config_from_hfgpt(HFGPTConfig.from_preset("tiny", **switch))


def test_wrong_source_type_and_used_output_are_refused(gpt2_dir, converted_dir, tmp_path):
    with pytest.raises(ValueError, match="'gpt2' model.*gpt2_to_hfgpt"):
        hfgpt_to_gpt2(gpt2_dir, tmp_path / "out")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        gpt2_to_hfgpt(gpt2_dir, tmp_path / "used")
    assert (tmp_path / "used" / "notes.txt").read_text() == "keep me"


def test_checkpoint_without_language_model_head_is_refused(tmp_path):
    # an untied GPT-2 saved from the classification head has no lm_head: converting it would invent one
    torch.manual_seed(0)
    config = GPT2Config(**SMALL_GPT2, tie_word_embeddings=False, pad_token_id=0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "classifier")
    with pytest.raises(ValueError, match="lm_head"):
        gpt2_to_hfgpt(tmp_path / "classifier", tmp_path / "out")


def test_pickled_weights_are_never_read(gpt2_dir, tmp_path):
    # the same weights as a pickle only: refused (safetensors only), and the pickle is not opened
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((gpt2_dir / "config.json").read_text())
    torch.save(load_file(gpt2_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        gpt2_to_hfgpt(pickled, tmp_path / "out")
    assert not (tmp_path / "out").exists()

"""`hfgpt export`: to transformers' Llama (same logits on a padded batch, cached and uncached, same greedy tokens, same
tokenizer), to GPT-2 through the same command, to GGUF (the file's structure and tokenizer; llama.cpp itself runs it in
tests/test_gguf_llama_cpp.py), and every bad input refused in one line, leaving nothing behind."""

import json
import re

import gguf
import jinja2
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GPT2LMHeadModel, LlamaForCausalLM

from hfgpt import HFGPTConfig, HFGPTForCausalLM
from hfgpt.cli import main as hfgpt_main
from hfgpt.convert import export as export_module
from hfgpt.convert.export import export
from hfgpt.convert.gguf import portable_chat_template
from hfgpt.tokenization import special_token_ids

ATOL = 1e-4


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its initial value (norm weights off 1, biases off 0), so that a misnamed, swapped or
    mis-ordered tensor changes the logits visibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def save_model(path, tokenizer, preset="modern-tiny", **overrides):
    torch.manual_seed(0)
    config = HFGPTConfig.from_preset(preset, **{**special_token_ids(tokenizer), **overrides})
    model = perturb_(HFGPTForCausalLM(config))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def modern_dir(tmp_path_factory, tiny_tokenizer):
    return save_model(tmp_path_factory.mktemp("modern") / "model", tiny_tokenizer)


def padded_batch(vocab=512, batch=3, length=40, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length // 2:] = 0  # a right-padded row
    if batch > 2:
        attention_mask[2, : length // 4] = 0  # and a left-padded one
    return input_ids, attention_mask


def run(capsys, *argv) -> tuple[int, str, str]:
    """`hfgpt *argv` -> (exit code, stdout, stderr), with nothing captured before the call."""
    capsys.readouterr()
    code = hfgpt_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.strip()


def load_pair(source, exported):
    hfgpt = AutoModelForCausalLM.from_pretrained(source).eval()
    other = AutoModelForCausalLM.from_pretrained(exported).eval()
    return hfgpt, other


# ---------------------------------------------------------------------------------------------------------------------
# --to llama: the same function


@pytest.mark.parametrize(
    "overrides",
    [{}, {"bias": True, "tie_word_embeddings": False, "rope_theta": 500.0, "num_key_value_heads": 1, "norm_eps": 1e-6},
     {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}],
    ids=["modern-tiny", "biases-untied-theta-mqa-eps", "yarn-scaling"],
)
def test_llama_export_has_the_same_logits_on_a_padded_batch(tmp_path, tiny_tokenizer, overrides):
    source = save_model(tmp_path / "hfgpt", tiny_tokenizer, **overrides)
    exported = export(source, tmp_path / "llama", "llama")
    hfgpt, llama = load_pair(source, exported)
    assert isinstance(llama, LlamaForCausalLM)
    assert llama.config.tie_word_embeddings == hfgpt.config.tie_word_embeddings
    assert llama.config.num_key_value_heads == hfgpt.config.num_key_value_heads
    assert llama.config.rope_parameters["rope_type"] == hfgpt.config.rope_parameters["rope_type"]
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        expected = hfgpt(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        actual = llama(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    assert expected.abs().max() > 1.0  # far from uniform: a wrong tensor would show
    real = attention_mask.bool()  # padded positions' logits are meaningless on both sides
    torch.testing.assert_close(actual[real], expected[real], atol=ATOL, rtol=0)


def test_llama_export_decodes_the_same_with_a_cache(modern_dir, tmp_path):
    hfgpt, llama = load_pair(modern_dir, export(modern_dir, tmp_path / "llama", "llama"))
    prompt, _ = padded_batch(batch=2, length=12, seed=2)
    steps = {}
    with torch.no_grad():
        for name, model in (("hfgpt", hfgpt), ("llama", llama)):
            cache, tokens, logits = DynamicCache(config=model.config), prompt, []
            for _ in range(20):  # the whole prompt, then one token at a time through the cache
                step = model(input_ids=tokens[:, cache.get_seq_length():], cache=cache, use_cache=True).logits[:, -1]
                logits.append(step)
                tokens = torch.cat([tokens, step.argmax(-1, keepdim=True)], dim=1)
            steps[name] = (tokens, torch.stack(logits, dim=1))
        uncached = llama(input_ids=steps["llama"][0][:, :-1], use_cache=False).logits[:, prompt.shape[1] - 1:]
    assert torch.equal(steps["llama"][0], steps["hfgpt"][0])
    torch.testing.assert_close(steps["llama"][1], steps["hfgpt"][1], atol=ATOL, rtol=0)
    torch.testing.assert_close(steps["llama"][1], uncached, atol=ATOL, rtol=0)


def test_llama_export_generates_the_same_greedy_tokens_on_a_left_padded_batch(modern_dir, tmp_path):
    hfgpt, llama = load_pair(modern_dir, export(modern_dir, tmp_path / "llama", "llama"))
    input_ids, attention_mask = padded_batch(batch=2, length=10, seed=3)
    attention_mask[1, :] = 1
    attention_mask[1, :4] = 0  # left padding, as generate wants it
    settings = dict(attention_mask=attention_mask, max_new_tokens=30, do_sample=False, pad_token_id=1,
                    eos_token_id=None)
    expected = hfgpt.generate(input_ids, **settings)
    assert torch.equal(llama.generate(input_ids, **settings), expected)
    assert torch.equal(llama.generate(input_ids, use_cache=False, **settings), expected)


def test_llama_export_is_a_complete_directory(modern_dir, tmp_path, tiny_tokenizer):
    exported = export(modern_dir, tmp_path / "llama", "llama")
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config  # plain transformers: no remote code needed
    assert not list(exported.glob("*.py")) and (exported / "generation_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    text = "Hello  world\n\nthe café 🙂<|user|>"
    assert tokenizer(text).input_ids == tiny_tokenizer(text).input_ids
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no partial directory left


@pytest.mark.parametrize(
    "preset, overrides, switch, alternative",
    [
        ("tiny", {}, "position_embedding_type='learned'", "--to gpt2"),  # GPT-2 shaped
        ("modern-tiny", dict(position_embedding_type="sinusoidal"), "position_embedding_type='sinusoidal'",
         "no export target"),
        ("modern-tiny", dict(norm_type="layernorm"), "norm_type='layernorm'", "no export target"),
        ("modern-tiny", dict(norm_position="post"), "norm_position='post'", "no export target"),
        ("modern-tiny", dict(hidden_act="gelu"), "hidden_act='gelu'", "no export target"),
        ("modern-tiny", dict(hidden_act="relu"), "hidden_act='relu'", "no export target"),
    ],
    ids=["learned", "sinusoidal", "layernorm", "post-norm", "gelu", "relu"],
)
def test_configs_llama_cannot_express_are_refused_with_the_switch_named(tmp_path, tiny_tokenizer, capsys, preset,
                                                                         overrides, switch, alternative):
    source = save_model(tmp_path / "hfgpt", tiny_tokenizer, preset=preset, **overrides)
    code, _, error = run(capsys, "export", "--to", "llama", str(source), str(tmp_path / "llama"))
    assert code == 1
    assert len(error.splitlines()) == 1 and switch in error and alternative in error
    assert list(tmp_path.iterdir()) == [source]


# ---------------------------------------------------------------------------------------------------------------------
# --to gpt2: the existing converter, through the same command


def test_gpt2_export_through_the_export_command(tmp_path, tiny_tokenizer, capsys):
    source = save_model(tmp_path / "hfgpt", tiny_tokenizer, preset="tiny")
    code, out, _ = run(capsys, "export", "--to", "gpt2", str(source), str(tmp_path / "gpt2"))
    assert code == 0 and "Exported" in out
    hfgpt, gpt2 = load_pair(source, tmp_path / "gpt2")
    assert isinstance(gpt2, GPT2LMHeadModel)
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        expected = hfgpt(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = gpt2(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=ATOL, rtol=0)
    # a Llama-shaped model is no GPT-2: refused with the switch named
    modern = save_model(tmp_path / "modern", tiny_tokenizer)
    code, _, error = run(capsys, "export", "--to", "gpt2", str(modern), str(tmp_path / "nope"))
    assert code == 1 and "position_embedding_type='rope'" in error


# ---------------------------------------------------------------------------------------------------------------------
# --to gguf: the file (llama.cpp runs it in test_gguf_llama_cpp.py)


@pytest.mark.parametrize("preset, architecture", [("modern-tiny", "llama"), ("tiny", "gpt2")])
def test_gguf_holds_the_architecture_the_weights_and_the_tokenizer(tmp_path, tiny_tokenizer, preset, architecture):
    source = save_model(tmp_path / "hfgpt", tiny_tokenizer, preset=preset)
    path = export(source, tmp_path / "model.gguf", "gguf", dtype="f32")
    reader = gguf.GGUFReader(path)
    field = lambda name: reader.fields[name].contents()  # noqa: E731
    assert field("general.architecture") == architecture
    config = HFGPTConfig.from_pretrained(source)
    assert field(f"{architecture}.block_count") == config.num_hidden_layers
    assert field(f"{architecture}.context_length") == config.max_position_embeddings
    # the vocabulary in id order, in tokenizer.json's byte-to-unicode spelling, and the merges
    vocab = tiny_tokenizer.get_vocab()
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size and all(tokens[index] == token for token, index in vocab.items())
    merges = json.loads(tiny_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert field("tokenizer.ggml.merges") == [" ".join(merge) for merge in merges]
    types = field("tokenizer.ggml.token_type")
    assert types[0] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.bos_token_id") == tiny_tokenizer.bos_token_id
    assert field("tokenizer.ggml.eos_token_id") == tiny_tokenizer.eos_token_id
    assert field("tokenizer.ggml.padding_token_id") == tiny_tokenizer.pad_token_id
    assert field("tokenizer.ggml.add_bos_token") is True  # hfgpt's tokenizer prepends <|endoftext|> to raw text
    assert not re.search(r"\{%-?\s*(end)?generation", field("tokenizer.chat_template"))
    # f32 keeps every weight exactly (the q/k rows of llama are reordered, see hfgpt/convert/gguf.py)
    model = HFGPTForCausalLM.from_pretrained(source)
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert torch.equal(torch.from_numpy(embedding.data.copy()), model.transformer.wte.weight.detach())


def test_portable_chat_template_renders_like_transformers(tiny_tokenizer):
    """Other Jinja engines do not know transformers' {% generation %}; the GGUF's template renders the same text."""
    template = portable_chat_template(tiny_tokenizer.chat_template)
    with pytest.raises(jinja2.TemplateSyntaxError):
        jinja2.Environment().from_string(tiny_tokenizer.chat_template)
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello! 🙂"}, {"role": "user", "content": "  and again  "}],
    ]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            expected = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                          tokenize=False)
            rendered = jinja2.Environment().from_string(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, eos_token=tiny_tokenizer.eos_token,
                bos_token=tiny_tokenizer.bos_token)
            assert rendered == expected


@pytest.mark.parametrize(
    "preset, overrides, switch",
    [("tiny", dict(norm_position="post"), "norm_position='post'"),
     ("tiny", dict(hidden_act="gelu"), "hidden_act='gelu'"),
     ("tiny", dict(bias=False), "bias=False"), ("tiny", dict(num_key_value_heads=2), "num_key_value_heads=2"),
     ("tiny", dict(position_embedding_type="sinusoidal"), "position_embedding_type='sinusoidal'"),
     ("modern-tiny", dict(norm_type="layernorm"), "norm_type='layernorm'"),
     ("modern-tiny", dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_type='linear'")],
    ids=["post-norm", "exact-gelu", "no-bias", "gqa-without-rope", "sinusoidal", "rope-layernorm", "rope-scaling"],
)
def test_gguf_refuses_what_neither_llama_nor_gpt2_holds(tmp_path, tiny_tokenizer, capsys, preset, overrides, switch):
    source = save_model(tmp_path / "hfgpt", tiny_tokenizer, preset=preset, **overrides)
    code, _, error = run(capsys, "export", "--to", "gguf", str(source), str(tmp_path / "model.gguf"))
    assert code == 1
    assert len(error.splitlines()) == 1 and switch in error
    assert list(tmp_path.iterdir()) == [source]


def test_gguf_refuses_a_tokenizer_that_is_not_byte_level_bpe(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # splits on whitespace and drops it: not byte-level
    backend.train_from_iterator(["the quick brown fox"] * 5,
                                trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<|endoftext|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>")
    source = save_model(tmp_path / "hfgpt", tokenizer)
    code, _, error = run(capsys, "export", "--to", "gguf", str(source), str(tmp_path / "model.gguf"))
    assert code == 1
    assert len(error.splitlines()) == 1 and "not a GPT-2 style byte-level BPE" in error and "Whitespace" in error
    assert "--to llama" in error  # what to do instead
    assert list(tmp_path.iterdir()) == [source]


# ---------------------------------------------------------------------------------------------------------------------
# Bad input, for every target


@pytest.mark.parametrize("target", ["llama", "gguf"])
def test_a_classifier_is_refused(tmp_path, tiny_tokenizer, capsys, target):
    from hfgpt import HFGPTForSequenceClassification

    config = HFGPTConfig.from_preset("modern-tiny", num_labels=2, **special_token_ids(tiny_tokenizer))
    HFGPTForSequenceClassification(config).save_pretrained(tmp_path / "classifier")
    code, _, error = run(capsys, "export", "--to", target, str(tmp_path / "classifier"), str(tmp_path / "out"))
    assert code == 1
    assert len(error.splitlines()) == 1 and "HFGPTForSequenceClassification" in error
    assert "not a causal language model" in error
    assert not (tmp_path / "out").exists()


def test_an_adapter_only_directory_is_refused_with_merge_first(tmp_path, tiny_tokenizer, capsys):
    from peft import LoraConfig, get_peft_model

    model = HFGPTForCausalLM(HFGPTConfig.from_preset("modern-tiny"))
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    code, _, error = run(capsys, "export", "--to", "gguf", str(tmp_path / "adapter"), str(tmp_path / "out.gguf"))
    assert code == 1
    assert len(error.splitlines()) == 1 and "adapter" in error and "merge" in error
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("target, name", [("llama", "llama"), ("gguf", "model.gguf")])
def test_an_existing_output_is_refused_unless_overwrite(modern_dir, tmp_path, capsys, target, name):
    output = tmp_path / name
    output.mkdir() if target == "llama" else output.write_text("keep me")
    marker = output / "keep" if target == "llama" else output
    if target == "llama":
        marker.write_text("keep me")
    code, _, error = run(capsys, "export", "--to", target, str(modern_dir), str(output))
    assert code == 1
    assert len(error.splitlines()) == 1 and "already exists" in error and "--overwrite" in error
    assert marker.read_text() == "keep me"
    assert run(capsys, "export", "--to", target, str(modern_dir), str(output), "--overwrite")[0] == 0
    assert not (output / "keep").exists() if target == "llama" else output.read_bytes()[:4] == b"GGUF"
    assert sorted(path.name for path in tmp_path.iterdir()) == [name]  # no scratch directory left


@pytest.mark.parametrize("target, name", [("llama", "llama"), ("gguf", "model.gguf")])
def test_a_failed_export_leaves_nothing_behind(modern_dir, tmp_path, monkeypatch, target, name):
    """The writer dies half-way (after writing part of its output): no partial file or directory remains, and an
    existing output that --overwrite would replace is kept."""
    from hfgpt.convert import gguf as gguf_module
    from hfgpt.convert import gpt2 as gpt2_module

    def write_half_then_fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    if target == "gguf":
        real = gguf_module.write_gguf

        def half_gguf(model, tokenizer, path, **kwargs):
            real(model, tokenizer, path, **kwargs)  # a complete file at the partial path, then the failure
            write_half_then_fail()

        monkeypatch.setattr(gguf_module, "write_gguf", half_gguf)
    else:
        real_copy = gpt2_module._copy_tokenizer_files

        def half_copy(source, output):
            real_copy(source, output)
            write_half_then_fail()

        monkeypatch.setattr(gpt2_module, "_copy_tokenizer_files", half_copy)
    with pytest.raises(OSError, match="simulated"):
        export(modern_dir, tmp_path / name, target)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / name).mkdir() if target == "llama" else (tmp_path / name).write_text("old")
    with pytest.raises(OSError, match="simulated"):
        export(modern_dir, tmp_path / name, target, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == [name]
    assert (tmp_path / name).is_dir() if target == "llama" else (tmp_path / name).read_text() == "old"


def test_export_help_and_dtype_only_for_gguf(modern_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        hfgpt_main(["export", "--help"])
    assert exit_.value.code == 0 and "--overwrite" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        hfgpt_main(["export", "--to", "llama", str(modern_dir), str(tmp_path / "out"), "--dtype", "f16"])
    assert exit_.value.code == 2 and "--dtype applies to --to gguf only" in capsys.readouterr().err
    assert set(export_module.EXPORTERS) == {"llama", "gpt2", "gguf"}

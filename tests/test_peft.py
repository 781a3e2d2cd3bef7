"""LoRA / QLoRA machinery (hfgpt.training.peft) on tiny models: merging, 4-bit training, saving and reloading."""

import json

import pytest
import torch
from safetensors import safe_open

import hfgpt  # noqa: F401  (registers the Auto classes)
from hfgpt import HFGPTConfig, HFGPTForCausalLM
from hfgpt.training.peft import (
    PeftArguments,
    add_lora,
    check_target_modules,
    linear_memory_footprint,
    linear_module_names,
    load_base_model,
    merge_adapter,
    parameter_counts,
    run_report,
    save_adapter_and_merge,
)

LABELS = {"id2label": {0: "neg", 1: "neutral", 2: "pos"}, "label2id": {"neg": 0, "neutral": 1, "pos": 2}}


@pytest.fixture
def base_dir(tmp_path, tiny_config):
    """A tiny pretrained causal LM on disk: the starting point of every fine-tuning run."""
    torch.manual_seed(0)
    path = tmp_path / "base"
    HFGPTForCausalLM(tiny_config).save_pretrained(path)
    return path


def _classifier(base_dir, peft_args):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return load_base_model(base_dir, AutoModelForSequenceClassification, peft_args, num_labels=3, pad_token_id=1,
                           **LABELS)


def _batch(seed=1, rows=6, length=12, device="cpu"):
    """On `device`: with a GPU, bitsandbytes places a 4-bit model there."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 512, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -4:] = 0  # one right-padded row: the head must pool the last real token
    labels = torch.arange(rows) % 3
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def _train(model, steps=8, lr=1e-2):
    input_ids, attention_mask, labels = _batch(device=model.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def _logits(model, seed=2):
    input_ids, attention_mask, _ = _batch(seed, device=model.device)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.cpu()


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_lora_merge_gives_the_adapter_models_logits_and_loads_without_peft(base_dir, tmp_path, variant):
    from transformers import AutoModelForSequenceClassification

    args = PeftArguments(lora=True, lora_dropout=0.0, use_rslora=variant == "rslora", use_dora=variant == "dora")
    model = add_lora(_classifier(base_dir, args), args, "SEQ_CLS")
    q_proj = model.base_model.model.transformer.h[0].attn.q_proj
    # LoRA scales the update by alpha / r, rsLoRA by alpha / sqrt(r); DoRA adds a trained magnitude per output
    expected_scaling = args.lora_alpha / (args.lora_r ** 0.5 if variant == "rslora" else args.lora_r)
    assert q_proj.scaling["default"] == pytest.approx(expected_scaling)
    assert ("default" in q_proj.lora_magnitude_vector) == (variant == "dora")
    model, _ = _train(model)
    lora_b = q_proj.lora_B["default"].weight
    assert lora_b.abs().max() > 0  # trained: merging a zero update would prove nothing
    expected = _logits(model)

    out = tmp_path / "out"
    adapter_dir = save_adapter_and_merge(model, out)
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(merged).__name__ == "HFGPTForSequenceClassification"
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert merged.config.id2label == LABELS["id2label"]
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=1e-5)
    # the merged directory is a plain hfgpt model directory: no adapter files at its top level
    assert not (out / "adapter_config.json").exists() and (adapter_dir / "adapter_config.json").is_file()


def test_lora_merge_causal_lm(base_dir):
    from transformers import AutoModelForCausalLM

    args = PeftArguments(lora=True, lora_dropout=0.0, lora_target_modules=["q_proj,v_proj", "down_proj"])
    model = add_lora(load_base_model(base_dir, AutoModelForCausalLM, args), args, "CAUSAL_LM")
    assert sorted(model.peft_config["default"].target_modules) == ["down_proj", "q_proj", "v_proj"]
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a non-zero update without training
            torch.nn.init.normal_(param, std=0.05)
    input_ids = torch.randint(5, 512, (2, 10))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_classifier_head_is_saved_with_the_adapter(base_dir, tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    args = PeftArguments(lora=True, lora_dropout=0.0, merge_adapter=False)
    model, _ = _train(add_lora(_classifier(base_dir, args), args, "SEQ_CLS"))
    trained_head = model.base_model.model.score.modules_to_save["default"].weight.detach().clone()
    expected = _logits(model)
    adapter_dir = save_adapter_and_merge(model, tmp_path / "out", merge=False)
    assert not (tmp_path / "out" / "model.safetensors").exists()  # merge=False: the adapter only

    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as handle:
        head_keys = [key for key in handle.keys() if ".score." in key]
        assert head_keys, f"no classification head in the adapter file: {list(handle.keys())}"
        torch.testing.assert_close(handle.get_tensor(head_keys[0]), trained_head)

    # PEFT's own loader gets the head back (the label count comes from the caller, as for any transformers model)
    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir, num_labels=3).eval()
    torch.testing.assert_close(_logits(reloaded), expected, atol=1e-5, rtol=1e-5)
    # merge_adapter reads the labels from the config saved next to the adapter
    merged = merge_adapter(adapter_dir).eval()
    assert merged.config.id2label == LABELS["id2label"]
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_peft_auto_class_alone_gives_back_the_trained_classifier_and_its_labels(tmp_path, capfd, tied):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = tmp_path / "base"
    HFGPTForCausalLM(HFGPTConfig.from_preset("tiny", tie_word_embeddings=tied)).save_pretrained(base)
    args = PeftArguments(lora=True, lora_dropout=0.0)
    model, _ = _train(add_lora(_classifier(base, args), args, "SEQ_CLS"), steps=20)
    adapter_dir = save_adapter_and_merge(model, tmp_path / "out")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()

    capfd.readouterr()
    # as the README says to load it: PEFT's Auto class and the adapter directory, nothing else
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir).eval()
    report = "".join(capfd.readouterr())
    assert "MISSING" not in report and "UNEXPECTED" not in report, report
    assert loaded.config.id2label == LABELS["id2label"] and loaded.config.num_labels == 3
    _, _, labels = _batch()

    def predicted_names(m):  # on the training rows, which the classifier has learned
        return [m.config.id2label[i] for i in _logits(m, seed=1).argmax(-1).tolist()]

    expected_names = [LABELS["id2label"][i] for i in labels.tolist()]
    assert predicted_names(loaded) == predicted_names(merged) == expected_names  # accuracy 1.0, as merged
    torch.testing.assert_close(_logits(loaded), _logits(merged), atol=1e-5, rtol=1e-5)
    # the adapter's base holds the pretrained weights as they are (hard-linked where the file system allows)
    linked = adapter_dir / "base" / "base-model.safetensors"
    assert linked.read_bytes() == (base / "model.safetensors").read_bytes()


def test_qlora_trains_saves_and_reloads(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    args = PeftArguments(qlora=True, lora_dropout=0.0)
    assert args.lora  # --qlora implies --lora
    base = _classifier(base_dir, args)
    assert type(base.transformer.h[0].attn.q_proj.weight).__name__ == "Params4bit"
    assert base.score.weight.dtype == torch.float32  # the new head is not quantised
    memory = linear_memory_footprint(base)
    model = add_lora(base, args, "SEQ_CLS")
    model, losses = _train(model, steps=12)
    assert losses[-1] < 0.5 * losses[0], losses
    expected = _logits(model)

    out = tmp_path / "out"
    adapter_dir = save_adapter_and_merge(model, out)
    # reload on a fresh 4-bit base: the same logits as before saving
    reloaded = PeftModel.from_pretrained(_classifier(base_dir, args), adapter_dir).eval()
    torch.testing.assert_close(_logits(reloaded), expected, atol=1e-5, rtol=1e-5)
    # the merged model is float32, without quantisation settings, and close to the 4-bit model (NF4 rounding apart)
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert merged.transformer.h[0].attn.q_proj.weight.dtype == torch.float32
    assert (_logits(merged).argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8

    report = run_report(model, memory, args)
    assert report["method"] == "qlora"
    assert report["parameters"]["trainable"] < report["parameters"]["total"]
    assert report["memory"]["peak_rss_bytes"] > 0
    assert report["lora"]["modules_to_save"] == ["score"]


@pytest.mark.parametrize("bias", [True, False])
def test_qlora_gradients_are_the_same_after_an_evaluation(tmp_path, bias):
    # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer for an inference-only kernel the first time it runs
    # in eval mode, and kept that layout for training: with a bias the step crashed, without one the gradient through
    # the frozen base weights was lost. Training after Trainer's evaluation must give the gradients of a fresh model.
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    HFGPTForCausalLM(HFGPTConfig.from_preset("tiny", bias=bias)).save_pretrained(base_dir)
    args = PeftArguments(qlora=True, lora_dropout=0.0)
    gradients = []
    for evaluate_first in (False, True):
        model = add_lora(_classifier(base_dir, args), args, "SEQ_CLS")
        input_ids, attention_mask, labels = _batch(device=model.device)
        if evaluate_first:
            _logits(model.eval())
        model.train()
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, msg=f"gradient of {name}")


def test_4bit_linear_footprint_is_under_35_percent_of_fp32(base_dir):
    full = _classifier(base_dir, PeftArguments())
    quantized = _classifier(base_dir, PeftArguments(qlora=True))
    fp32, nf4 = linear_memory_footprint(full), linear_memory_footprint(quantized)
    assert fp32["linear_layers"] == nf4["linear_layers"] == 12  # 2 blocks x (q, k, v, o, up, down)
    assert fp32["linear_bytes"] == fp32["linear_fp32_bytes"] and fp32["quantization"] is None
    assert nf4["linear_fp32_bytes"] == fp32["linear_bytes"]
    assert nf4["linear_bytes"] < 0.35 * fp32["linear_bytes"], nf4
    # 4-bit weights are counted by their real size, not by the packed uint8 storage
    assert parameter_counts(quantized)["total"] == parameter_counts(full)["total"]


def test_lora_with_gradient_checkpointing_reaches_the_adapters(base_dir):
    args = PeftArguments(lora=True, lora_dropout=0.0)
    model = add_lora(_classifier(base_dir, args), args, "SEQ_CLS")
    model.activation_checkpointing_enable()  # what Trainer calls for --gradient_checkpointing
    assert model.base_model.model.transformer.gradient_checkpointing
    input_ids, attention_mask, labels = _batch()
    model.train()
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    lora_a = model.base_model.model.transformer.h[0].attn.q_proj.lora_A["default"].weight
    lora_b = model.base_model.model.transformer.h[0].attn.q_proj.lora_B["default"].weight
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0
    assert lora_a.grad is not None  # zero at the first step (B starts at 0), but computed


def test_lora_target_matching_nothing_names_the_linear_layers(base_dir):
    model = _classifier(base_dir, PeftArguments())
    assert linear_module_names(model) == ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "score"]
    with pytest.raises(ValueError, match=r"'c_attn'.*matches no linear layer.*q_proj, k_proj, v_proj, o_proj"):
        add_lora(model, PeftArguments(lora=True, lora_target_modules=["q_proj", "c_attn"]), "SEQ_CLS")
    with pytest.raises(ValueError, match="gate_proj"):  # only SwiGLU models have it
        check_target_modules(model, ["gate_proj"])


def test_lora_modules_to_save_are_trained_saved_and_merged(base_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    args = PeftArguments(lora=True, lora_dropout=0.0, lora_modules_to_save="wte ln_f")
    model = add_lora(_classifier(base_dir, args), args, "SEQ_CLS")
    assert {"wte", "ln_f", "score"} <= set(model.peft_config["default"].modules_to_save)
    wte = model.base_model.model.transformer.wte
    original = wte.original_module.weight.detach().clone()
    model, _ = _train(model)
    trained = wte.modules_to_save["default"].weight.detach().clone()
    assert not torch.equal(trained, original)  # the copy was trained, the original left as it was
    torch.testing.assert_close(wte.original_module.weight, original)
    expected = _logits(model)

    adapter_dir = save_adapter_and_merge(model, tmp_path / "out")
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as handle:
        assert any(".wte." in key for key in handle.keys()) and any(".ln_f." in key for key in handle.keys())
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(merged.transformer.wte.weight, trained)
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=1e-5)


def test_lora_modules_to_save_errors(base_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match=r"'embed_tokens' matches no module.*wte, wpe.*ln_1.*score"):
        add_lora(_classifier(base_dir, PeftArguments()), PeftArguments(lora=True, lora_modules_to_save="embed_tokens"),
                 "SEQ_CLS")
    # a causal LM ties wte to lm_head: a trained copy of wte would leave lm_head behind
    args = PeftArguments(lora=True, lora_modules_to_save=["wte,ln_f"])
    with pytest.raises(ValueError, match=r"'wte' is the token embedding.*tie"):
        add_lora(load_base_model(base_dir, AutoModelForCausalLM, args), args, "CAUSAL_LM")
    args = PeftArguments(lora=True, lora_modules_to_save=["ln_f"])
    model = add_lora(load_base_model(base_dir, AutoModelForCausalLM, args), args, "CAUSAL_LM")
    assert model.peft_config["default"].modules_to_save == ["ln_f"]


def test_peft_arguments_from_the_command_line():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(PeftArguments)
    (args,) = parser.parse_args_into_dataclasses(["--qlora", "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj",
                                                  "o_proj"])
    assert args.lora and args.qlora and args.lora_r == 4 and not args.use_dora and not args.use_rslora
    assert args.lora_target_modules == ["q_proj", "v_proj", "o_proj"]
    (args,) = parser.parse_args_into_dataclasses(["--lora", "--use_dora", "--use_rslora", "--lora_modules_to_save",
                                                  "wte,wpe", "ln_f"])
    assert args.use_dora and args.use_rslora and args.lora_modules_to_save == ["wte", "wpe", "ln_f"]
    (args,) = parser.parse_args_into_dataclasses([])
    assert not args.lora and args.lora_target_modules is None and args.lora_modules_to_save is None
    assert args.merge_adapter
    with pytest.raises(ValueError, match="lora_r"):
        PeftArguments(lora=True, lora_r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        PeftArguments(lora=True, lora_dropout=1.0)


def test_swiglu_model_gets_gate_proj_by_default(tmp_path):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "modern"
    HFGPTForCausalLM(HFGPTConfig.from_preset("modern-tiny")).save_pretrained(path)
    args = PeftArguments(lora=True)
    model = add_lora(load_base_model(path, AutoModelForCausalLM, args), args, "CAUSAL_LM")
    assert "gate_proj" in model.peft_config["default"].target_modules

"""The CUDA paths: bf16, fused SDPA kernels (flash too), the KV cache, 4-bit QLoRA, Trainer in bf16, torch.compile.

CI has no GPU, so these tests are skipped there; run them on a CUDA machine with `pytest tests/test_cuda.py`.
The CPU suite covers the same features in float32; these check what only a GPU exercises.
"""

import json

import pytest
import torch

from hfgpt import HFGPTConfig, HFGPTForCausalLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
# the GPT-2 layout and the modern one (rotary, RMSNorm, SwiGLU, grouped-query attention)
PRESETS = ["tiny", "modern-tiny"]


def _model(preset, dtype=torch.float32, attn="sdpa"):
    torch.manual_seed(0)
    config = HFGPTConfig.from_preset(preset, embedding_dropout=0.0, attention_dropout=0.0, residual_dropout=0.0)
    model = HFGPTForCausalLM(config)
    model.set_attn_implementation(attn)
    return model.to(CUDA, dtype).eval()


def _padded_batch(rows=4, length=24, vocab=512):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, vocab, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :7] = 0  # left padding, as generate() batches prompts
    attention_mask[2, :2] = 0
    return input_ids.to(CUDA), attention_mask.to(CUDA)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_agrees_with_eager_on_a_padded_batch(preset, dtype):
    input_ids, attention_mask = _padded_batch()
    logits = {}
    for attn in ("eager", "sdpa"):
        with torch.no_grad():
            logits[attn] = _model(preset, dtype, attn)(input_ids, attention_mask=attention_mask).logits.float()
    real = attention_mask.bool()  # padded positions' outputs are meaningless in both
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(logits["sdpa"][real], logits["eager"][real], atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_logits_follow_float32(preset):
    input_ids, attention_mask = _padded_batch()
    with torch.no_grad():
        reference = _model(preset)(input_ids, attention_mask=attention_mask).logits
        half = _model(preset, torch.bfloat16)(input_ids, attention_mask=attention_mask).logits
    assert half.dtype == torch.bfloat16
    real = attention_mask.bool()
    torch.testing.assert_close(half.float()[real], reference[real], atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("preset", PRESETS)
def test_unpadded_training_step_runs_on_the_flash_kernel(preset):
    # Without padding the model must hand SDPA no mask (is_causal instead): flash attention refuses explicit masks.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _model(preset, torch.bfloat16).train()
    input_ids, _ = _padded_batch()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        reference = model(input_ids, labels=input_ids).loss
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.float(), reference.float(), atol=2e-2, rtol=2e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("preset", PRESETS)
def test_cached_greedy_generation_equals_recomputing_everything(preset):
    model = _model(preset)
    input_ids, attention_mask = _padded_batch(length=10)
    common = dict(attention_mask=attention_mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    cached = model.generate(input_ids, use_cache=True, **common)
    recomputed = model.generate(input_ids, use_cache=False, **common)
    assert torch.equal(cached, recomputed)


def test_bf16_sampling_and_beam_search_run_on_cuda():
    model = _model("modern-tiny", torch.bfloat16)
    input_ids, attention_mask = _padded_batch(length=8)
    sampled = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=True, top_k=20,
                             top_p=0.9, pad_token_id=0, eos_token_id=None)
    beams = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, num_beams=3, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    assert sampled.shape == beams.shape == (4, 16)
    assert sampled.device == beams.device == input_ids.device


@pytest.mark.parametrize("preset", PRESETS)
def test_gradient_checkpointing_gives_the_same_gradients(preset):
    input_ids, _ = _padded_batch()
    gradients = []
    for checkpointing in (False, True):
        model = _model(preset).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids, labels=input_ids).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, msg=f"gradient of {name}")


def test_compiled_training_step_matches_eager():
    model = _model("modern-tiny").train()
    input_ids, _ = _padded_batch()
    eager = model(input_ids, labels=input_ids).loss
    compiled = torch.compile(model, fullgraph=True)  # inductor: Triton kernels on the GPU
    loss = compiled(input_ids, labels=input_ids).loss
    loss.backward()
    torch.testing.assert_close(loss, eager, atol=1e-4, rtol=1e-4)
    assert model.transformer.wte.weight.grad is not None


def test_qlora_classifier_trains_in_4bit_on_cuda_and_merges(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from hfgpt.training.peft import (
        PeftArguments,
        add_lora,
        linear_memory_footprint,
        load_base_model,
        save_adapter_and_merge,
    )

    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    HFGPTForCausalLM(HFGPTConfig.from_preset("modern-tiny")).save_pretrained(base_dir)
    args = PeftArguments(qlora=True, lora_dropout=0.0)
    labels_config = dict(num_labels=2, pad_token_id=1, id2label={0: "ham", 1: "spam"}, label2id={"ham": 0, "spam": 1})
    base = load_base_model(base_dir, AutoModelForSequenceClassification, args, **labels_config)
    q_proj = base.transformer.h[0].attn.q_proj
    assert type(q_proj.weight).__name__ == "Params4bit" and q_proj.weight.device.type == "cuda"
    assert q_proj.compute_dtype == torch.bfloat16  # bf16 compute where the GPU supports it
    full = linear_memory_footprint(AutoModelForSequenceClassification.from_pretrained(base_dir, **labels_config))
    assert linear_memory_footprint(base)["linear_bytes"] < 0.35 * full["linear_bytes"]

    model = add_lora(base, args, "SEQ_CLS").train()
    input_ids, attention_mask = _padded_batch(rows=8)
    labels = (torch.arange(8, device=CUDA) % 2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        expected = model.eval()(input_ids=input_ids, attention_mask=attention_mask).logits.float()

    out = tmp_path / "merged"
    save_adapter_and_merge(model, out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForSequenceClassification.from_pretrained(out).to(CUDA).eval()
    with torch.no_grad():
        logits = merged(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75


def test_pretraining_in_bf16_with_trainer_on_cuda(tmp_path, tiny_corpus, tiny_tokenizer):
    from hfgpt import files
    from hfgpt.training.pretrain import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(tiny_corpus), encoding="utf-8")
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    output_dir = tmp_path / "run"
    code = main(["--output_dir", str(output_dir), "--train_file", str(corpus), "--tokenizer_name_or_path",
                 str(tmp_path / "tokenizer"), "--preset", "modern-tiny", "--block_size", "64", "--sample_by", "line",
                 "--per_device_train_batch_size", "16", "--max_steps", "40", "--learning_rate", "3e-3",
                 "--logging_steps", "5", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
                 "--num_samples", "0", "--disable_tqdm", "true", "--seed", "7", "--bf16", "true",
                 "--dataloader_num_workers", "0"])
    assert code == 0
    history = json.loads((output_dir / files.LOG_HISTORY_JSON).read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[-1] < 0.7 * losses[0], losses
    reloaded = HFGPTForCausalLM.from_pretrained(output_dir)
    assert reloaded.dtype == torch.float32  # mixed precision keeps float32 master weights, saved as such


def test_speed_defaults_on_cuda(tmp_path):
    """hfgpt's defaults on a GPU: bf16 from compute capability 8.0, sdpa kept for compiled training (its flash
    kernels win there), compiled decoding on by default with generate()'s tokens, and a measured bf16 peak."""
    from hfgpt import flops
    from hfgpt.generation import compiled_by_default, generate
    from hfgpt.training.pretrain import PretrainingArguments
    from hfgpt.training.speed import attention_for_compiled_training

    args = PretrainingArguments(output_dir=str(tmp_path), report_to="none")
    assert args.bf16 == (torch.cuda.get_device_capability()[0] >= 8)
    model = _model("tiny")
    assert attention_for_compiled_training(model, CUDA) is None and model.config._attn_implementation == "sdpa"
    assert compiled_by_default(model)
    input_ids, attention_mask = _padded_batch(rows=2, length=10)
    settings = dict(attention_mask=attention_mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                    pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(generate(model, input_ids, **settings), model.generate(input_ids, **settings))
    assert flops.measure_matmul_peak(torch.bfloat16, CUDA, size=2048, seconds=0.1) > 1e12


@pytest.mark.parametrize("preset", PRESETS)
def test_int8_weights_decode_on_cuda(preset):
    """`--quantize int8` on a GPU: torch._weight_int8pack_mm's CUDA kernel computes the fp32 model's logits up to the
    int8 rounding, and the compiled decoding (the default there) runs over a padded batch."""
    from hfgpt.generation import compiled_by_default, generate
    from hfgpt.quantization import quantize_int8

    model = _model(preset)
    input_ids, attention_mask = _padded_batch(rows=2, length=10)
    with torch.no_grad():
        exact = model(input_ids, attention_mask=attention_mask).logits
        quantize_int8(model)
        logits = model(input_ids, attention_mask=attention_mask).logits
        assert (logits - exact).abs().max() < 0.03 * exact.abs().max()
        assert compiled_by_default(model)
        output = generate(model, input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert output.shape == (2, 18)

"""int8 weights for decoding (hfgpt.quantization): the rounding is what the docstring says, a quantised model computes
what the full-precision one does up to that rounding, decodes eagerly and compiled, and the commands that take
`--quantize int8` (chat, eval) use it and keep its results apart from the model's own."""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from hfgpt import HFGPTConfig, HFGPTForCausalLM
from hfgpt.cards import build_model_card
from hfgpt.cli import main as hfgpt_main
from hfgpt.files import EVAL_RESULTS, read_json
from hfgpt.generation import generate
from hfgpt.quantization import Int8Linear, QuantizedSaveError, quantize, quantize_int8
from test_evaluation import CHAT_TEMPLATE, CORPUS, lm_dir, make_tokenizer, write_jsonl  # noqa: F401 (fixture)


def test_int8_rows_round_to_within_half_a_step_of_the_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    linear.weight.data[3] = 0.0  # an all-zero row must not divide by zero
    layer = Int8Linear(linear)
    assert layer.weight_int8.dtype == torch.int8 and layer.weight_int8.shape == (48, 64)
    # each row uses the full range (126 where the bf16-rounded scale came out a little above max|w| / 127)
    assert layer.weight_int8.abs().amax(dim=1)[torch.arange(48) != 3].ge(126).all()
    step = layer.weight_scale.float()[:, None]
    # half a step of rounding; where the bf16 scale rounded down, the largest weight is clamped to 127 steps, which
    # can cut it by up to 2^-8 of its 127 steps
    bound = step / 2 + 127 * step * 2.0 ** -8
    assert ((layer.dequantized_weight() - linear.weight).abs() <= bound).all()
    assert layer.dequantized_weight()[3].eq(0).all()


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_computes_the_linear_layer_up_to_rounding(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    layer = Int8Linear(linear)
    x = torch.randn(2, 5, 96)
    y = layer(x)
    assert y.shape == (2, 5, 40) and y.dtype == torch.float32
    exact = linear(x).detach()
    # int8 weights (0.4% of a row's largest weight) and bf16 activations (0.4% each): about 1% of the output's scale
    assert (y - exact).abs().max() < 0.02 * exact.abs().max()
    # and exactly what the dequantised weight gives with bf16-rounded inputs, up to bf16 output rounding
    reference = nn.functional.linear(x.bfloat16().float(), layer.dequantized_weight(), linear.bias)
    torch.testing.assert_close(y, reference.detach(), rtol=1e-2, atol=1e-2)


def tiny_lm(**overrides) -> HFGPTForCausalLM:
    torch.manual_seed(0)
    return HFGPTForCausalLM(HFGPTConfig.from_preset("tiny", vocab_size=300, **overrides)).eval()


@pytest.mark.parametrize("overrides", [{}, {"position_embedding_type": "rope", "norm_type": "rmsnorm",
                                             "hidden_act": "swiglu", "num_key_value_heads": 2}])
def test_quantized_model_replaces_every_linear_and_keeps_the_logits(overrides):
    model = tiny_lm(**overrides)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        exact = model(ids).logits
        quantized = quantize_int8(model)
        logits = quantized(ids).logits
    assert quantized is model and not quantized.training
    assert not any(isinstance(module, nn.Linear) for module in model.modules())
    assert [name for name, module in model.named_modules() if isinstance(module, Int8Linear)] == linears
    assert "lm_head" in linears  # the tied output head too (the embedding itself stays full precision)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert (logits - exact).abs().max() < 0.03 * exact.abs().max()


def test_int8_decoding_eager_and_compiled():
    """Greedy decoding with int8 weights through hfgpt's generate(), eagerly and with the compiled static-cache step,
    batch 2 with left padding. The compiled step rounds its bf16 inputs from slightly different fp32 values (fused
    kernels), so the two agree to rounding, not bit for bit: their logits are compared, not their tokens."""
    model = quantize_int8(tiny_lm())
    ids = torch.randint(1, 300, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
                    output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        eager = generate(model, ids, compiled=False, **settings)
        compiled = generate(model, ids, compiled=True, **settings)
    assert eager.sequences.shape == compiled.sequences.shape == (2, 16)
    first_eager, first_compiled = eager.scores[0], compiled.scores[0]  # the same prompt: the same first step
    assert (first_compiled - first_eager).abs().max() < 0.02 * first_eager.abs().max()


def test_quantize_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="Conv1D"):
        quantize_int8(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)))
    model = quantize_int8(tiny_lm())
    with pytest.raises(ValueError, match="already int8"):
        quantize_int8(model)
    with pytest.raises(ValueError, match="Unknown quantization 'int4'"):
        quantize(tiny_lm(), "int4")
    assert quantize(model, None) is model

    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(tiny_lm(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        quantize_int8(adapted)


def test_eval_with_int8_weights_is_kept_apart_and_out_of_the_model_index(lm_dir, tmp_path):  # noqa: F811
    path, _, _ = lm_dir
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": text} for text in CORPUS[:4]])
    common = ["eval", "perplexity", "--model_name_or_path", str(path), "--file", str(data), "--max_length", "16"]
    assert hfgpt_main(common) == 0
    assert hfgpt_main([*common, "--quantize", "int8"]) == 0
    results = read_json(path / EVAL_RESULTS)
    assert set(results) == {"perplexity", "perplexity@texts.jsonl+int8"}
    full, int8 = results["perplexity"], results["perplexity@texts.jsonl+int8"]
    assert "quantization" not in full and int8["quantization"] == "int8"
    assert int8["perplexity"] == pytest.approx(full["perplexity"], rel=0.05)  # the same model, rounded weights
    assert int8["perplexity"] != full["perplexity"]  # but it did run with int8 weights
    assert hfgpt_main([*common, "--quantize", "int8"]) == 0  # again: replaces its own entry only
    assert set(read_json(path / EVAL_RESULTS)) == {"perplexity", "perplexity@texts.jsonl+int8"}

    card = build_model_card(path)
    assert "texts.jsonl (int8 weights)" in card.text
    published = [result for result in card.data.eval_results or [] if result.metric_type == "perplexity"]
    assert [result.metric_value for result in published] == [full["perplexity"]]


def test_eval_rouge_refuses_quantize_with_a_predictions_file(tmp_path, capsys):
    data = write_jsonl(tmp_path / "predictions.jsonl", [{"prediction": "a", "reference": "a"}])
    with pytest.raises(SystemExit):
        hfgpt_main(["eval", "rouge", "--predictions_file", str(data), "--quantize", "int8"])
    assert "--quantize applies when generating" in capsys.readouterr().err


def test_chat_answers_with_int8_weights(tmp_path, capsys):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = HFGPTForCausalLM(HFGPTConfig.from_preset("tiny", vocab_size=len(tokenizer)))
    model.save_pretrained(tmp_path / "chat")
    tokenizer.save_pretrained(tmp_path / "chat")
    arguments = ["chat", str(tmp_path / "chat"), "--prompt", "hello", "--temperature", "0", "--max_new_tokens", "5"]
    assert hfgpt_main([*arguments, "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit):
        hfgpt_main([*arguments, "--quantize", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_an_int8_model_refuses_to_be_saved(tmp_path):
    """The int8 layers' buffers are not transformers' weight names: saved, they would load back as a model with random
    weights in their place. Saving is refused with what to do instead, and nothing is written."""
    model = quantize_int8(tiny_lm())
    with pytest.raises(QuantizedSaveError, match="Save or export the full-precision model"):
        model.save_pretrained(tmp_path / "int8")
    assert not list((tmp_path / "int8").glob("*.safetensors"))


def test_int8_decoding_is_compiled_by_default_on_a_cpu_and_fp32_is_not():
    """An int8 step reads its weights from cache, so compiling (removing Python and dispatch) is what speeds it up;
    an fp32 step streams its weights from memory either way (hfgpt.generation.compiled_by_default)."""
    from hfgpt.generation import compiled_by_default
    from hfgpt.hardware import compiler_available

    if not compiler_available(torch.device("cpu"))[0]:
        pytest.skip("no C++ compiler for inductor")
    assert compiled_by_default(quantize_int8(tiny_lm()))
    assert not compiled_by_default(tiny_lm())


def test_eval_rouge_generates_with_int8_weights(lm_dir, tmp_path):  # noqa: F811
    path, _, _ = lm_dir
    rows = [{"instruction": f"Name colour {index}.", "input": "", "output": "Blue."} for index in range(3)]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    assert hfgpt_main(["eval", "rouge", "--model_name_or_path", str(path), "--prompts_file", str(data),
                       "--max_new_tokens", "4", "--batch_size", "2", "--quantize", "int8"]) == 0
    saved = read_json(path / EVAL_RESULTS)["rouge"]
    assert saved["quantization"] == "int8" and saved["num_examples"] == 3

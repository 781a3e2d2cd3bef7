"""Speed: FLOP accounting and the matmul peak, bf16/compile defaults and their fallbacks, tokens/s and MFU in the
logs, and the compiled decoding path (same tokens as generate())."""

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainingArguments

from hfgpt import HFGPTConfig, HFGPTForCausalLM, files, flops
from hfgpt.generation import generate, static_cache_length
from hfgpt.onednn import onednn_available, onednn_supported
from hfgpt.training import speed
from hfgpt.training.common import NonFiniteTrainingError
from hfgpt.training.pretrain import PretrainingArguments, main

from test_pretrain import corpus_file, logged, tiny_run_args, tokenizer_dir  # noqa: F401  (fixtures)

# --------------------------------------------------------------------------------------------------------------------
# FLOPs


def test_parameter_counts_match_gpt2_small():
    counts = flops.count_parameters(HFGPTConfig.from_preset("gpt2"))
    assert counts.total == 124_439_808  # OpenAI's GPT-2 small, tied output layer counted once
    assert counts.embedding == 50257 * 768 + 1024 * 768
    assert counts.non_embedding == 85_056_000
    # every block's four attention and two MLP matrices, plus the (tied) output layer
    assert counts.matmul == 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 50257 * 768
    assert counts.matmul_without_lm_head == counts.matmul - 50257 * 768


@pytest.mark.parametrize("overrides", [{}, dict(num_key_value_heads=2, hidden_act="swiglu", bias=False,
                                                position_embedding_type="rope", norm_type="rmsnorm")])
def test_flops_per_token_is_6n_plus_12ldt(overrides):
    config = HFGPTConfig.from_preset("tiny", **overrides)
    model = HFGPTForCausalLM(config)
    n = sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))
    layers, width, seq_len = config.num_hidden_layers, config.num_attention_heads * config.head_dim, 100
    assert flops.forward_flops_per_token(config, seq_len) == 2 * n + 4 * layers * width * seq_len
    assert flops.training_flops_per_token(config, seq_len) == 6 * n + 12 * layers * width * seq_len
    # frozen weights need no weight gradients: a third of their training FLOPs fewer
    frozen = flops.training_flops_per_token(config, seq_len, trainable_fraction=0.0)
    assert frozen == 4 * n + 12 * layers * width * seq_len


def test_a_mixture_of_experts_counts_the_experts_a_token_uses():
    dense = HFGPTConfig.from_preset("tiny", bias=False)
    moe = HFGPTConfig.from_preset("tiny", bias=False, num_experts=4, num_experts_per_tok=2)
    dense_counts, moe_counts = flops.count_parameters(dense), flops.count_parameters(moe)
    mlp = 2 * dense.hidden_size * dense.intermediate_size  # up and down projections
    router = dense.hidden_size * 4
    assert moe_counts.total == dense_counts.total + dense.num_hidden_layers * (3 * mlp + router)
    # per token: two of the four experts (twice the dense MLP) and the router
    assert moe_counts.matmul == dense_counts.matmul + dense.num_hidden_layers * (mlp + router)


def test_matmul_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HFGPT_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda dtype, device: calls.append(dtype) or 1.5e11)
    assert flops.matmul_peak(torch.float32) == 1.5e11
    assert flops.matmul_peak(torch.float32) == 1.5e11
    assert flops.matmul_peak(torch.bfloat16) == 1.5e11
    assert calls == [torch.float32, torch.bfloat16]
    assert len(json.loads((tmp_path / "matmul_peak.json").read_text())) == 2
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda dtype, device: calls.append(dtype) or 1e11)
    assert flops.matmul_peak(torch.float32, refresh=True) == 1.5e11  # a busier machine does not lower the peak
    assert len(calls) == 3


def test_measured_peak_is_a_plausible_rate():
    peak = flops.measure_matmul_peak(torch.float32, "cpu", size=256, seconds=0.05)
    assert 1e8 < peak < 1e14  # between a slow phone and a large GPU; mostly: a number, measured, positive


# --------------------------------------------------------------------------------------------------------------------
# bf16 and compile: defaults and bad input


def _args(tmp_path, **kwargs):
    return PretrainingArguments(output_dir=str(tmp_path), report_to="none", **kwargs)


def test_bf16_defaults_to_what_the_cpu_computes_natively(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "native_bf16", lambda device: (True, "this CPU has AVX512-BF16"))
    args = _args(tmp_path)
    assert args.bf16 is True and args.use_cpu is True  # transformers needs use_cpu for bf16 without a GPU
    assert args.torch_compile is False  # hfgpt compiles itself, Trainer must not
    monkeypatch.setattr(speed, "native_bf16", lambda device: (False, "this CPU has neither"))
    assert _args(tmp_path).bf16 is False
    assert _args(tmp_path, bf16=False).bf16 is False


def test_bf16_request_on_hardware_without_it_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "native_bf16", lambda device: (False, "this CPU has neither AVX512-BF16 nor AMX"))
    with pytest.raises(ValueError, match=r"--bf16 true: this CPU has neither AVX512-BF16 nor AMX.*--bf16 false"):
        _args(tmp_path, bf16=True)


def test_fp16_is_still_refused_on_a_cpu(tmp_path, corpus_file, tokenizer_dir, capsys):  # noqa: F811
    assert main(tiny_run_args(tmp_path / "run", corpus_file, tokenizer_dir, "--fp16", "true")) == 1
    assert "--fp16 needs a CUDA" in capsys.readouterr().err


def test_compile_is_chosen_by_the_runs_length():
    assert speed.compile_pays_off(10 * speed.COMPILE_PAYS_AFTER_SECONDS)[0]
    short, reason = speed.compile_pays_off(5.0)
    assert not short and "less than" in reason
    assert not speed.compile_pays_off(None)[0]


def test_torch_compile_flags(tmp_path):
    assert _args(tmp_path, torch_compile=False).hfgpt_torch_compile is False
    assert _args(tmp_path, torch_compile=True).hfgpt_torch_compile is True
    assert _args(tmp_path).hfgpt_torch_compile in ("auto", False)  # "auto": decided from the run's length
    # a compile mode asks for compilation, as in TrainingArguments, but hfgpt applies it itself
    args = _args(tmp_path, torch_compile_mode="max-autotune-no-cudagraphs")
    assert args.hfgpt_torch_compile is True and args.hfgpt_compile_options == {"mode": "max-autotune-no-cudagraphs"}
    assert args.torch_compile is False and args.torch_compile_mode is None


def _failing_backend(graph_module, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


def test_compile_failure_falls_back_to_eager_with_a_warning(tiny_model):
    torch.manual_seed(0)
    input_ids = torch.randint(0, tiny_model.config.vocab_size, (2, 16))
    expected = tiny_model(input_ids, labels=input_ids).loss
    speed.compile_with_fallback(tiny_model, backend=_failing_backend)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*this backend cannot compile.*runs eagerly"):
        loss = tiny_model(input_ids, labels=input_ids).loss
    torch.testing.assert_close(loss, expected)
    assert not speed.is_compiled(tiny_model) and "cannot compile" in tiny_model.hfgpt_compile_error
    loss.backward()  # and it trains
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every call
        tiny_model(input_ids, labels=input_ids)


def test_errors_of_the_models_own_code_are_not_swallowed(tiny_model):
    speed.compile_with_fallback(tiny_model, backend="eager")
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        tiny_model()


# --------------------------------------------------------------------------------------------------------------------
# Training runs


@pytest.mark.skipif(not speed.native_bf16(torch.device("cpu"))[0], reason="this CPU computes bf16 by emulation only")
def test_bf16_loss_curve_tracks_fp32(tmp_path, corpus_file, tokenizer_dir):  # noqa: F811
    """Same data, same seed, 40 steps of the tiny model at a learning rate it learns fast with.

    Tolerance: bf16 keeps 8 bits of mantissa, so each logit carries a relative rounding error of ~0.4% and the
    per-step losses wobble by about that much; the optimizer (fp32 master weights, fp32 AdamW) takes slightly different
    steps that do not compound much over 40 steps. The final loss must be within 1% of fp32's (measured on the
    development CPU: 0.03%, and at most 0.07% at any step), and bf16 must learn: its loss must fall by at least 95% as
    much as fp32's does. A wrong dtype (fp16 overflow, a missing autocast) or a broken optimizer fails both."""
    common = ["--max_steps", "40", "--learning_rate", "3e-3", "--warmup_steps", "4", "--torch_compile", "false"]
    for precision in ("false", "true"):
        assert main(tiny_run_args(tmp_path / precision, corpus_file, tokenizer_dir, *common,
                                  "--bf16", precision)) == 0
    fp32, bf16 = logged(tmp_path / "false"), logged(tmp_path / "true")
    assert len(fp32) == len(bf16) == 40
    assert abs(bf16[-1] - fp32[-1]) < 0.01 * fp32[-1], (fp32[-1], bf16[-1])
    assert (bf16[0] - bf16[-1]) > 0.95 * (fp32[0] - fp32[-1])
    summary = json.loads((tmp_path / "true" / files.TRAINING_SUMMARY).read_text())
    assert summary["speed"]["precision"] == "bf16" and summary["hyperparameters"]["bf16"] is True


def test_every_training_log_has_tokens_per_second_and_mfu(tmp_path, corpus_file, tokenizer_dir):  # noqa: F811
    assert main(tiny_run_args(tmp_path, corpus_file, tokenizer_dir, "--torch_compile", "false")) == 0
    history = json.loads((tmp_path / files.LOG_HISTORY_JSON).read_text())
    training_logs = [entry for entry in history if "loss" in entry]
    assert len(training_logs) == 6
    for entry in training_logs:
        assert entry["tokens_per_second"] > 0 and 0 < entry["mfu"] < 1.5
    summary = json.loads((tmp_path / files.TRAINING_SUMMARY).read_text())["speed"]
    # 6 steps of 4 blocks of 32 tokens; FLOPs counted per micro-batch from hfgpt.flops
    assert summary["training_tokens_this_session"] == 6 * 4 * 32
    config = HFGPTConfig.from_pretrained(tmp_path)
    assert summary["train_flops_this_session"] == 6 * 4 * 32 * flops.training_flops_per_token(config, 32)
    assert summary["tokens_per_second"] > 0 and summary["torch_compile"] is False
    card = (tmp_path / files.MODEL_CARD).read_text()
    assert "tokens_per_second" in card and "mfu" in card


@pytest.mark.skipif(not onednn_supported(torch.device("cpu"))[0], reason=onednn_supported(torch.device("cpu"))[1])
def test_fp32_training_goes_through_onednn_says_so_and_learns_the_same(
        tmp_path, corpus_file, tokenizer_dir, monkeypatch, capsys):  # noqa: F811
    """HFGPT_ONEDNN=1 / 0 force the choice that is otherwise measured; the tiny model's products are all below the
    size from which oneDNN pays, so the threshold is lowered. Same data, same seed: fp32 both ways, the products
    summed in another order, so the losses agree to float rounding (measured: at most 2e-7 relative over 40 steps)."""
    monkeypatch.setattr("hfgpt.onednn.MIN_TRAINING_PRODUCT", 0)
    monkeypatch.setattr(flops, "matmul_peak", lambda dtype, device: 1e11)  # its measurement would count too
    common = ["--bf16", "false", "--torch_compile", "false"]
    calls = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("HFGPT_ONEDNN", switch)
        args = tiny_run_args(tmp_path / switch, corpus_file, tokenizer_dir, *common)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            assert main(args) == 0
        calls[switch] = sum(event.count for event in prof.key_averages() if event.key == "hfgpt::onednn_linear")
        line = capsys.readouterr().out
        assert ("fp32 linear layers through oneDNN: HFGPT_ONEDNN=1" in line) == (switch == "1"), line
        summary = json.loads((tmp_path / switch / files.TRAINING_SUMMARY).read_text())["speed"]
        assert summary["fp32_linears_through_onednn"] is (switch == "1")
    # 13 linear layers (2 blocks x q, k, v, o, up, down; the LM head): 6 steps x 3 products (forward, two backward),
    # and the final evaluation's forward (one batch)
    assert calls == {"1": 13 * (6 * 3 + 1), "0": 0}
    for ours, reference in zip(logged(tmp_path / "1"), logged(tmp_path / "0"), strict=True):
        assert ours == pytest.approx(reference, rel=1e-5)


def test_compiled_training_still_stops_a_diverged_run(tmp_path, corpus_file, tokenizer_dir,  # noqa: F811
                                                      poison_weights_at, capsys):
    """The compiled model reads its weights at every call (they are not baked in), so poisoned weights show."""
    from hfgpt.training.pretrain import parse_args, prepare_pretraining, train_and_save

    run = prepare_pretraining(*parse_args(tiny_run_args(tmp_path, corpus_file, tokenizer_dir,
                                                        "--torch_compile", "true")),
                              callbacks=[poison_weights_at(3)])
    assert speed.is_compiled(run.trainer.model)
    assert "torch.compile on (asked for)" in capsys.readouterr().out
    with pytest.raises(NonFiniteTrainingError, match="diverged by step 4"):  # the first log after the damage
        train_and_save(run)
    assert logged(tmp_path)[0] > 0  # the compiled steps before it ran and logged


# --------------------------------------------------------------------------------------------------------------------
# Compiled decoding


def test_static_cache_length_is_bucketed_within_the_context():
    assert static_cache_length(10, 20, 1024) == 128
    assert static_cache_length(100, 60, 1024) == 256
    assert static_cache_length(100, 28, 128) == 128  # exactly the context
    assert static_cache_length(10, 20, None) == 128


@pytest.mark.parametrize("overrides", [{}, dict(position_embedding_type="rope", norm_type="rmsnorm",
                                                hidden_act="swiglu", num_key_value_heads=2, bias=False)],
                         ids=["gpt2-like", "modern"])
def test_compiled_decoding_gives_generates_tokens(overrides):
    config = HFGPTConfig.from_preset("tiny", bos_token_id=0, eos_token_id=0, pad_token_id=0, **overrides)
    torch.manual_seed(0)
    model = HFGPTForCausalLM(config).eval()
    input_ids = torch.randint(1, config.vocab_size, (3, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = attention_mask[2, :7] = 0  # left padding
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    settings = dict(attention_mask=attention_mask, max_new_tokens=16, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(generate(model, input_ids, compiled=True, do_sample=False, **settings),
                           model.generate(input_ids, do_sample=False, **settings))
        torch.manual_seed(5)
        expected = model.generate(input_ids, do_sample=True, top_k=20, **settings)
        torch.manual_seed(5)
        assert torch.equal(generate(model, input_ids, compiled=True, do_sample=True, top_k=20, **settings), expected)
        one = input_ids[2:, 7:]  # batch of one, no padding
        assert torch.equal(generate(model, one, compiled=True, do_sample=False, max_new_tokens=16, eos_token_id=None),
                           model.generate(one, do_sample=False, max_new_tokens=16, eos_token_id=None))
    assert hasattr(model, "_compiled_call")  # the compiled step was really used
    if onednn_available(torch.device("cpu"))[0]:  # and its linear layers computed through oneDNN (hfgpt.onednn)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(model, input_ids, compiled=True, do_sample=False, **settings)
        assert any(event.key == "hfgpt::onednn_linear" for event in prof.key_averages())
        # attention written out (fused by inductor) rather than sdpa's CPU kernel, and sdpa again afterwards
        assert not any("scaled_dot_product" in event.key for event in prof.key_averages())
        assert model.config._attn_implementation == "sdpa"

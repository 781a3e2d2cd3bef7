"""fp32 linear layers through oneDNN (hfgpt.onednn): for inference (same results, packed weights) and for training
(same gradients); used where measured faster than MKL or as $HFGPT_ONEDNN says."""

import contextlib

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hfgpt import HFGPTConfig, HFGPTForCausalLM
from hfgpt.generation import generate
from hfgpt import onednn
from hfgpt.onednn import ENV_SWITCH, MIN_TRAINING_PRODUCT, onednn_available, onednn_linears, onednn_supported
from hfgpt.onednn import onednn_training_linears

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not onednn_supported(CPU)[0], reason=onednn_supported(CPU)[1])


@pytest.fixture(autouse=True)
def onednn_on(monkeypatch):
    """Every test here exercises oneDNN, whatever this CPU's measurement chose (the choice has its own test)."""
    monkeypatch.setenv(ENV_SWITCH, "1")


def tiny_model() -> HFGPTForCausalLM:
    torch.manual_seed(0)
    return HFGPTForCausalLM(HFGPTConfig.from_preset("tiny", bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


def onednn_calls(run, ops=("mkldnn::_linear_pointwise", "hfgpt::onednn_linear")) -> int:
    """How many oneDNN linear calls `run()` makes (the eager op or hfgpt's op, which calls the eager one)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(event.count for event in prof.key_averages() if event.key in ops)


def routed_layers(model) -> list:
    return [module for module in model.modules() if "forward" in vars(module)]


def test_inference_goes_through_onednn_with_the_same_logits_and_the_layers_are_restored():
    model = tiny_model()
    ids = torch.randint(1, 512, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        with onednn_linears(model) as routed:
            assert routed == sum(type(module) is torch.nn.Linear for module in model.modules()) > 0
            logits = model(ids).logits
            assert onednn_calls(lambda: model(ids)) >= routed
        assert onednn_calls(lambda: model(ids)) == 0
    assert routed_layers(model) == []
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_training_inside_the_block_takes_the_ordinary_path():
    model = tiny_model().train()
    ids = torch.randint(1, 512, (2, 12))
    model(ids, labels=ids).loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with onednn_linears(model):
        assert onednn_calls(lambda: model(ids, labels=ids).loss.backward()) == 0
    for parameter, grad in zip(model.parameters(), expected):
        assert torch.equal(parameter.grad, grad)


def test_a_weight_changed_inside_the_block_is_seen():
    model = tiny_model()
    ids = torch.randint(1, 512, (1, 8))
    with torch.no_grad(), onednn_linears(model):
        before = model(ids).logits
        model.lm_head.weight.mul_(2)  # in place, as an optimizer step changes it (the LM head is tied to wte)
        after = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(after, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before)


def test_an_inner_block_uses_the_outer_ones_packing_and_leaves_it_in_place():
    model = tiny_model()  # as `hfgpt chat` holds one block for the session and generate() opens one per answer
    with onednn_linears(model) as outer:
        packed = model.lm_head._packed
        with onednn_linears(model) as inner:
            assert inner == 0
        assert outer > 0 and model.lm_head._packed is packed and len(routed_layers(model)) == outer
    assert routed_layers(model) == []


def test_one_row_goes_through_onednn_only_when_the_weights_do_not_fit_in_the_cache(monkeypatch):
    model = tiny_model()  # 0.5 MB of linear weights: held in any last-level cache
    one_row = torch.randint(1, 512, (1, 1))
    with torch.no_grad():
        with onednn_linears(model):
            assert onednn_calls(lambda: model(one_row)) == 0  # MKL's matrix-vector product is quicker there
            assert onednn_calls(lambda: model(torch.randint(1, 512, (2, 1)))) > 0
        monkeypatch.setattr("hfgpt.onednn.last_level_cache_bytes", lambda: 2**16)
        with onednn_linears(model):
            assert onednn_calls(lambda: model(one_row)) > 0


def test_layers_are_restored_after_an_error():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="inside"), onednn_linears(model):
        raise RuntimeError("inside")
    assert routed_layers(model) == []


def test_what_it_leaves_alone():
    assert not onednn_available(torch.device("cuda"))[0]
    model = tiny_model().to(torch.bfloat16)  # bf16 products already go through oneDNN
    with onednn_linears(model) as routed:
        assert routed == 0
    fp32_model = tiny_model()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), onednn_linears(fp32_model) as routed:
        assert routed > 0 and onednn_calls(lambda: fp32_model(torch.randint(1, 512, (1, 4)))) == 0


def test_eager_decoding_uses_it_and_gives_generates_tokens():
    model = tiny_model()
    ids = torch.randint(1, 512, (2, 8))
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        expected = model.generate(ids, **settings)
        assert torch.equal(generate(model, ids, compiled=False, **settings), expected)
        assert onednn_calls(lambda: generate(model, ids, compiled=False, **settings)) > 0
    assert routed_layers(model) == []


def test_batched_answers_pack_the_weights_once(tiny_tokenizer):
    from hfgpt.evaluation.cli import generate_responses

    model = tiny_model()
    prompts = ["the cat sat", "a red apple", "near the river", "blue hill", "some pears"]
    responses = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        responses += generate_responses(model, tiny_tokenizer, prompts, max_new_tokens=4, batch_size=2,
                                        progress=False)[0]
    packed = sum(event.count for event in prof.key_averages() if event.key == "mkldnn::_reorder_linear_weight")
    layers = sum(type(module) is torch.nn.Linear for module in model.modules())
    assert len(responses) == 5 and packed == layers  # three batches, one packing
    assert routed_layers(model) == []


# --------------------------------------------------------------------------------------------------------------------
# When: supported, measured faster, or as $HFGPT_ONEDNN says


def test_it_is_used_where_measured_faster_or_as_the_switch_says(monkeypatch):
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    monkeypatch.setattr(onednn, "onednn_speedup", lambda: 1.05)
    available, why = onednn_available(CPU)
    assert not available and "as fast" in why
    monkeypatch.setattr(onednn, "onednn_speedup", lambda: 2.2)
    assert onednn_available(CPU) == (True, "oneDNN's fp32 products measured 2.2x MKL's on this CPU")
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert not onednn_available(CPU)[0]
    with onednn_linears(tiny_model()) as routed:
        assert routed == 0
    monkeypatch.setattr(onednn, "onednn_speedup", lambda: 1.0)
    monkeypatch.setenv(ENV_SWITCH, "1")
    assert onednn_available(CPU)[0]
    monkeypatch.setenv(ENV_SWITCH, "sometimes")
    with pytest.raises(ValueError, match="HFGPT_ONEDNN='sometimes': use 1"):
        onednn_available(CPU)


def test_the_speedup_is_a_measured_ratio():
    onednn.onednn_speedup.cache_clear()
    speedup = onednn.onednn_speedup()
    assert 0.05 < speedup < 50 and onednn.onednn_speedup() == speedup  # measured once per process


# --------------------------------------------------------------------------------------------------------------------
# Training: forward and backward products through oneDNN (onednn_training_linears)


@pytest.fixture
def every_product(monkeypatch):
    """Route products of any size (the tiny shapes here are below MIN_TRAINING_PRODUCT)."""
    monkeypatch.setattr(onednn, "MIN_TRAINING_PRODUCT", 0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight_trains", [True, False])  # False: a frozen base layer under LoRA
def test_training_products_match_f_linear_forward_and_backward(every_product, bias, weight_trains):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=bias)
    layer.weight.requires_grad_(weight_trains)
    x = torch.randn(3, 7, 48, requires_grad=True)
    upstream = torch.randn(3, 7, 80)

    def grads(block):
        x.grad = None
        layer.zero_grad()
        with block:
            y = layer(x)
            (y * upstream).sum().backward()
        return [y.detach(), x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]

    expected = grads(contextlib.nullcontext())
    got = []
    calls = onednn_calls(lambda: got.extend(grads(onednn_training_linears(layer))), ops=("hfgpt::onednn_linear",))
    assert calls == 2 + weight_trains  # forward, the input's gradient, the weight's when it trains
    assert len(got) == len(expected) == 2 + weight_trains + bias
    for ours, reference in zip(got, expected):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert routed_layers(layer) == []


def test_training_leaves_small_products_bf16_and_autocast_alone():
    small, big = torch.nn.Linear(64, 64), torch.nn.Linear(512, 512)
    rows = torch.randn(MIN_TRAINING_PRODUCT // 512**2, 512)
    model = torch.nn.ModuleDict({"small": small, "big": big})
    with onednn_training_linears(model) as routed:
        assert routed == 2
        assert onednn_calls(lambda: small(torch.randn(4, 64))) == 0  # 16K multiply-adds: MKL is quicker
        assert onednn_calls(lambda: big(rows), ops=("hfgpt::onednn_linear",)) == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert onednn_calls(lambda: big(rows)) == 0
        with onednn_training_linears(model) as inner:
            assert inner == 0 and len(routed_layers(model)) == 2  # an enclosing block's routing is left in place
    with onednn_training_linears(model.to(torch.bfloat16)) as routed:
        assert routed == 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_model_trains_the_same_through_onednn_with_and_without_activation_checkpointing(every_product, checkpointing):
    """Activation checkpointing recomputes the forward pass during the backward one and requires it to save the same
    tensors: the routed layers are routed in the recomputation too."""
    model, reference = tiny_model().train(), tiny_model().train()
    if checkpointing:
        for m in (model, reference):
            m.gradient_checkpointing_enable()
    ids = torch.randint(1, 512, (2, 16))
    with onednn_training_linears(model):
        loss = model(ids, labels=ids).loss
        calls = onednn_calls(loss.backward, ops=("hfgpt::onednn_linear",))
    expected = reference(ids, labels=ids).loss
    expected.backward()
    layers = sum(type(module) is torch.nn.Linear for module in model.modules())
    # the backward's two products per layer, and with checkpointing the blocks' forward products again
    assert calls == 2 * layers + (layers - 1 if checkpointing else 0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6)


def test_lora_layers_train_through_onednn(every_product):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model().train(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    reference = get_peft_model(tiny_model().train(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(1, 512, (2, 16))
    with onednn_training_linears(model) as routed:
        assert routed == sum(type(module) is torch.nn.Linear for module in model.modules())
        loss = model(ids, labels=ids).loss
        loss.backward()
    expected = reference(ids, labels=ids).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    trained = [(ours, theirs) for ours, theirs in zip(model.parameters(), reference.parameters()) if ours.requires_grad]
    assert trained and all(torch.allclose(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6) for ours, theirs in trained)


def test_a_compiled_training_step_goes_through_onednn_without_recompiling(every_product):
    from hfgpt.training.speed import compile_with_fallback

    model = tiny_model().train()
    reference = tiny_model().train()
    compile_with_fallback(model)
    ids = torch.randint(1, 512, (2, 16))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference)]
    torch._dynamo.utils.counters.clear()
    with onednn_training_linears(model):
        for step in range(3):
            loss = model(ids, labels=ids).loss
            loss.backward()
            expected = reference(ids, labels=ids).loss
            expected.backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        assert onednn_calls(lambda: model(ids, labels=ids).loss.backward()) > 0
    assert getattr(model, "hfgpt_compile_error", None) is None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_hfgpts_trainers_route_the_policy_and_a_dpo_reference_model():
    import types

    from hfgpt.training.speed import SpeedMixin

    trainer = types.SimpleNamespace(_onednn=True, model=tiny_model(), ref_model=tiny_model())
    linears = sum(type(module) is torch.nn.Linear for module in trainer.model.modules())
    with SpeedMixin._linear_kernels(trainer):
        assert len(routed_layers(trainer.model)) == len(routed_layers(trainer.ref_model)) == linears
    assert routed_layers(trainer.model) == routed_layers(trainer.ref_model) == []
    trainer._onednn = False  # bf16 runs, or where MKL is as fast
    with SpeedMixin._linear_kernels(trainer):
        assert routed_layers(trainer.model) == []

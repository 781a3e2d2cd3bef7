"""fp32 linear layers through oneDNN during inference (hfgpt.onednn): same results, ordinary path for training."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hfgpt import HFGPTConfig, HFGPTForCausalLM
from hfgpt.generation import generate
from hfgpt.onednn import onednn_available, onednn_linears

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not onednn_available(CPU)[0], reason=onednn_available(CPU)[1])


def tiny_model() -> HFGPTForCausalLM:
    torch.manual_seed(0)
    return HFGPTForCausalLM(HFGPTConfig.from_preset("tiny", bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


def onednn_calls(run) -> int:
    """How many oneDNN linear calls `run()` makes (the eager op or hfgpt's compiled custom op)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(event.count for event in prof.key_averages()
               if event.key in ("mkldnn::_linear_pointwise", "hfgpt::onednn_linear"))


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

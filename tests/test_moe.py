"""Mixture of experts (config.num_experts >= 2): routing, the load-balancing loss, and everything the dense model does."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

from hfgpt import HFGPTConfig, HFGPTForCausalLM
from hfgpt.modeling_hfgpt import HFGPTMLP, HFGPTSparseMoeBlock, load_balancing_loss


def moe_config(preset: str = "tiny", **overrides) -> HFGPTConfig:
    return HFGPTConfig.from_preset(preset, **{"num_experts": 4, "num_experts_per_tok": 2, **overrides})


def moe_model(preset: str = "tiny", seed: int = 0, **overrides) -> HFGPTForCausalLM:
    torch.manual_seed(seed)
    return HFGPTForCausalLM(moe_config(preset, **overrides))


def copy_dense_mlps_into_experts(dense: HFGPTForCausalLM, moe: HFGPTForCausalLM) -> None:
    """Every non-MLP weight from the dense model, and every expert a copy of the dense block's MLP."""
    dense_state = dense.state_dict()
    state = {}
    for key, value in moe.state_dict().items():
        if ".mlp.gate." in key:
            state[key] = value  # the router keeps its own (random) weights
        elif ".mlp.experts." in key:
            prefix, rest = key.split(".mlp.experts.")
            state[key] = dense_state[f"{prefix}.mlp.{rest.split('.', 1)[1]}"]
        else:
            state[key] = dense_state[key]
    moe.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------------
# Config


def test_dense_by_default_and_with_one_expert():
    for config in (HFGPTConfig.from_preset("tiny"), HFGPTConfig.from_preset("tiny", num_experts=1)):
        assert not config.is_moe
        # as transformers' dense models: no MoE settings (TRL takes output_router_logits for the sign of an MoE model)
        assert not any(hasattr(config, name) for name in ("output_router_logits", "num_experts_per_tok",
                                                           "router_aux_loss_coef", "decoder_sparse_step"))
        model = HFGPTForCausalLM(config).eval()
        assert not any(".mlp.gate." in name or "experts" in name for name, _ in model.named_parameters())
        out = model(torch.randint(0, 512, (1, 5)), labels=torch.randint(0, 512, (1, 5)))
        assert type(out) is CausalLMOutputWithPast


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok=5 must be in 1..num_experts=4"),
        (dict(num_experts=4, num_experts_per_tok=0), "num_experts_per_tok=0 must be an integer >= 1"),
        (dict(num_experts=-1), "num_experts=-1 must be an integer >= 0"),
        (dict(num_experts=2.5), "num_experts=2.5 must be an integer >= 0"),
        (dict(num_experts=4, router_aux_loss_coef=-0.1), "router_aux_loss_coef=-0.1 must be a number >= 0"),
        (dict(num_experts=4, router_aux_loss_coef=float("nan")), "router_aux_loss_coef=nan must be a number >= 0"),
        (dict(num_experts=4, moe_every_n_layers=3), "moe_every_n_layers=3 must be in 1..num_hidden_layers=2"),
        (dict(num_experts=4, moe_every_n_layers=0), "moe_every_n_layers=0 must be an integer >= 1"),
        (dict(num_experts=4, output_router_logits="yes"), "output_router_logits='yes' must be True or False"),
    ],
)
def test_bad_moe_settings_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        HFGPTConfig.from_preset("tiny", **overrides)


def test_transformers_moe_names_and_round_trip():
    config = HFGPTConfig.from_preset("tiny", num_local_experts=8, decoder_sparse_step=2, num_experts_per_tok=1)
    assert (config.num_experts, config.moe_every_n_layers, config.num_local_experts) == (8, 2, 8)
    assert config.moe_intermediate_size == config.intermediate_size
    again = HFGPTConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict() and again.num_experts_per_tok == 1
    with pytest.raises(ValueError, match="router_aux_loss_coef=-1"):  # checked on a dense config too
        HFGPTConfig.from_preset("tiny", router_aux_loss_coef=-1)


def test_moe_every_n_layers_picks_the_blocks():
    model = moe_model(num_hidden_layers=4, moe_every_n_layers=2)
    assert [type(block.mlp) for block in model.transformer.h] == [HFGPTMLP, HFGPTSparseMoeBlock] * 2
    out = model.eval()(torch.randint(0, 512, (1, 6)), output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (6, 4)


def test_swiglu_experts():
    model = moe_model("modern-tiny")
    expert = model.transformer.h[0].mlp.experts[3]
    assert expert.gated and expert.gate_proj.out_features == model.config.intermediate_size


# ---------------------------------------------------------------------------------------------------------------------
# Routing


def test_one_expert_top1_equals_the_dense_mlp():
    config = HFGPTConfig.from_preset("tiny")
    torch.manual_seed(0)
    mlp = HFGPTMLP(config)
    config.num_experts, config.num_experts_per_tok = 1, 1  # below the config's MoE threshold: built by hand
    block = HFGPTSparseMoeBlock(config)
    block.experts[0].load_state_dict(mlp.state_dict())
    x = torch.randn(2, 7, 64)
    out, router_logits = block(x)
    assert router_logits.shape == (14, 1)
    torch.testing.assert_close(out, mlp(x))


@pytest.mark.parametrize("top_k", [1, 2])
def test_experts_that_are_the_dense_mlp_give_the_dense_model(top_k):
    """Whatever the router picks, k copies of the dense MLP weighted by renormalised probabilities are the dense MLP."""
    torch.manual_seed(0)
    dense = HFGPTForCausalLM(HFGPTConfig.from_preset("tiny")).eval()
    moe = moe_model(num_experts_per_tok=top_k).eval()
    copy_dense_mlps_into_experts(dense, moe)
    ids = torch.randint(0, 512, (2, 11))
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_routing_sends_each_token_to_its_top_k_experts(top_k):
    config = moe_config(num_experts_per_tok=top_k)
    torch.manual_seed(0)
    block = HFGPTSparseMoeBlock(config)
    rows = []
    for e, expert in enumerate(block.experts):
        expert.register_forward_hook(lambda module, args, output, e=e: rows.append((e, args[0].shape[0])))
    x = torch.randn(3, 5, 64)
    out, router_logits = block(x)
    assert sum(n for _, n in rows) == 15 * top_k  # each token ran through exactly k experts

    # the reference, one token at a time: the k highest-probability experts, weights renormalised to sum to 1
    flat = x.reshape(-1, 64)
    probs = torch.softmax(router_logits, dim=-1)
    expected = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        top = probs[t].topk(top_k)
        for weight, e in zip(top.values / top.values.sum(), top.indices):
            expected[t] += weight * block.experts[int(e)](flat[t])
    torch.testing.assert_close(out.reshape(-1, 64), expected)


def test_compiled_dispatch_matches_the_eager_one():
    torch.manual_seed(0)
    block = HFGPTSparseMoeBlock(moe_config())
    x = torch.randn(2, 9, 64)
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x)[0], block(x)[0])


# ---------------------------------------------------------------------------------------------------------------------
# The load-balancing loss


def test_balance_loss_is_one_for_a_uniform_router_and_more_when_skewed():
    model = moe_model(router_aux_loss_coef=0.25).train()
    for block in model.transformer.h:
        torch.nn.init.zeros_(block.mlp.gate.weight)  # every expert equally likely for every token
    ids = torch.randint(0, 512, (2, 12))
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.aux_loss, torch.tensor(1.0))
    lm_loss = model.loss_function(logits=out.logits, labels=ids, vocab_size=512)
    torch.testing.assert_close(out.loss, lm_loss + 0.25 * 1.0)

    logits = torch.randn(24, 4)
    logits[:, 0] += 3.0  # expert 0 favoured
    assert load_balancing_loss((logits,), 4, 2) > 1.2
    # Mixtral's normalisation counts assignments per token: its value is top_k times ours
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.testing.assert_close(load_balancing_loss_func((logits,), 4, 2) / 2, load_balancing_loss((logits,), 4, 2))


def test_padding_tokens_do_not_count_in_the_balance_loss():
    logits = torch.randn(2 * 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    expected = load_balancing_loss((logits[mask.reshape(-1).bool()],), 4, 2)
    torch.testing.assert_close(load_balancing_loss((logits,), 4, 2, mask), expected)

    # in the model: what stands in the padded positions (right padding) changes nothing
    model = moe_model().eval()
    ids = torch.randint(1, 512, (2, 6))
    other = ids.clone()
    other[1, 3:] = torch.randint(1, 512, (3,))
    first = model(ids, attention_mask=mask, output_router_logits=True).aux_loss
    second = model(other, attention_mask=mask, output_router_logits=True).aux_loss
    torch.testing.assert_close(first, second)
    assert not torch.allclose(first, model(other, output_router_logits=True).aux_loss)


def test_aux_loss_reported_in_training_and_on_request_only():
    model = moe_model()
    ids = torch.randint(0, 512, (2, 8))
    train_out = model.train()(ids, labels=ids)
    assert type(train_out) is MoeCausalLMOutputWithPast and train_out.aux_loss is not None
    assert train_out.router_logits is None  # collected for the loss, returned only when asked for
    eval_out = model.eval()(ids, labels=ids)
    assert eval_out.aux_loss is None  # evaluation's loss is the LM loss alone (perplexity)
    asked = model(ids, labels=ids, output_router_logits=True)
    assert len(asked.router_logits) == 2
    torch.testing.assert_close(asked.loss, eval_out.loss + 0.01 * asked.aux_loss)
    assert model.train()(ids, labels=ids, output_router_logits=True).router_logits is not None


def test_gradient_accumulation_counts_the_balance_loss_once():
    """Two micro-batches with num_items_in_batch (as Trainer passes it) sum to the LM loss of the whole batch plus
    coef x the token-weighted mean balance loss: not twice it."""
    model = moe_model(router_aux_loss_coef=0.5).train()
    ids = torch.randint(0, 512, (4, 10))
    labels = ids.clone()
    labels[3, :6] = -100
    total = (labels[:, 1:] != -100).sum()
    parts = [model(ids[i : i + 2], labels=labels[i : i + 2], num_items_in_batch=total) for i in (0, 2)]
    tokens = [(labels[i : i + 2, 1:] != -100).sum() for i in (0, 2)]
    lm = model.loss_function(logits=model(ids, labels=labels).logits, labels=labels, vocab_size=512)
    mean_aux = sum(p.aux_loss * n for p, n in zip(parts, tokens)) / total
    torch.testing.assert_close(parts[0].loss + parts[1].loss, lm + 0.5 * mean_aux)


# ---------------------------------------------------------------------------------------------------------------------
# Everything the dense model does


def test_cached_and_uncached_decoding_agree():
    model = moe_model("modern-tiny").eval()
    ids = torch.randint(0, 512, (2, 7))
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)
    # the last step's logits, one token at a time with the cache against the whole sequence at once
    full = model(cached).logits[:, -1]
    out = model(cached[:, :-1], use_cache=True)
    step = model(cached[:, -1:], cache=out.cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


def test_overfits_a_batch():
    model = moe_model("modern-tiny").train()
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (2, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        out = model(ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        first = first if first is not None else out.loss.item()
    lm_loss = out.loss.item() - model.config.router_aux_loss_coef * out.aux_loss.item()
    assert first > 5.0 and lm_loss < 0.3, (first, lm_loss)
    # every router learned something: its gradient reached it
    assert all(block.mlp.gate.weight.abs().sum() > 0 for block in model.transformer.h)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 512, (2, 10))
    grads = []
    for checkpointing in (False, True):
        model = moe_model(seed=0).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        out = model(ids, labels=ids)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys()
    assert any(".mlp.gate." in name for name in grads[0][1])
    for name in grads[0][1]:
        torch.testing.assert_close(grads[1][1][name], grads[0][1][name], msg=name)


def test_training_step_compiles_in_one_graph():
    model = moe_model("modern-tiny").train()
    ids = torch.randint(0, 512, (2, 16))
    eager = model(ids, labels=ids)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss)
    torch.testing.assert_close(out.aux_loss, eager.aux_loss)
    assert model.transformer.h[0].mlp.gate.weight.grad is not None


CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["hfgpt"] = None  # hfgpt is not installed here
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    path, inputs_path, out_path = sys.argv[1:]
    ids = load_file(inputs_path)["ids"]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    out = model(ids, output_router_logits=True)
    generated = model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    save_file({"logits": out.logits.contiguous(), "aux_loss": out.aux_loss.detach(), "generated": generated},
              out_path)
    """
)


def test_save_load_and_remote_code(tmp_path):
    model = moe_model("modern-tiny", num_hidden_layers=2, moe_every_n_layers=2).eval()
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(1, 512, (2, 9))
    expected = model(ids, output_router_logits=True)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert type(reloaded) is HFGPTForCausalLM
    assert (reloaded.config.num_experts, reloaded.config.moe_every_n_layers) == (4, 2)
    torch.testing.assert_close(reloaded(ids).logits, expected.logits, atol=0, rtol=0)

    save_file({"ids": ids}, tmp_path / "inputs.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "model"), str(tmp_path / "inputs.safetensors"),
         str(tmp_path / "out.safetensors")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = load_file(tmp_path / "out.safetensors")
    torch.testing.assert_close(outputs["logits"], expected.logits)  # another process: its own thread count
    torch.testing.assert_close(outputs["aux_loss"], expected.aux_loss.detach())
    assert torch.equal(outputs["generated"], model.generate(ids[:1], max_new_tokens=5, do_sample=False,
                                                            pad_token_id=0))


def test_lora_adapts_the_experts_and_the_router_and_merges():
    from hfgpt.training.peft import PeftArguments, add_lora

    model = moe_model("modern-tiny")
    args = PeftArguments(lora=True, lora_dropout=0.0)
    lora = add_lora(model, args, "CAUSAL_LM")
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in lora.named_parameters() if ".lora_A." in name}
    assert any(name.endswith("h.0.mlp.gate") for name in adapted)
    assert any(name.endswith("h.1.mlp.experts.3.down_proj") for name in adapted)
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    ids = torch.randint(0, 512, (2, 8))
    lora.eval()
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
        merged = lora.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)

"""torch.compile captures the whole model in one graph (no graph breaks), for training and for cached decoding."""

import torch
from transformers import StaticCache

from hfgpt import HFGPTConfig, HFGPTForCausalLM


def test_training_step_compiles_in_one_graph():
    torch.manual_seed(0)
    model = HFGPTForCausalLM(HFGPTConfig.from_preset("modern-tiny")).train()
    ids = torch.randint(0, 512, (2, 16))
    eager_loss = model(ids, labels=ids).loss
    # aot_eager traces forward and backward like inductor does, without its C++ compile time
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    assert model.transformer.wte.weight.grad is not None


def test_static_cache_decode_step_compiles_in_one_graph():
    torch.manual_seed(0)
    model = HFGPTForCausalLM(HFGPTConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, 512, (1, 6))
    expected = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)

    cache = StaticCache(config=model.config, max_cache_len=16)
    step = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True)
        tokens = ids
        for _ in range(4):
            next_token = out.logits[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, next_token], dim=1)
            position = torch.tensor([[tokens.shape[1] - 1]])
            out = step(next_token, cache=cache, position_ids=position, use_cache=True)
    assert torch.equal(tokens, expected)

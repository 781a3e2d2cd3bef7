"""The model: every architecture switch, caches, masks, training hooks and the heads."""

import copy

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from hfgpt import (
    HFGPTConfig,
    HFGPTForCausalLM,
    HFGPTForQuestionAnswering,
    HFGPTForSequenceClassification,
    HFGPTForTokenClassification,
    HFGPTModel,
)
from hfgpt.modeling_hfgpt import HFGPTRotaryEmbedding

VOCAB = 512

# One variant per switch value, each differing from the `tiny` preset (learned, layernorm, pre, gelu_new, tied, MHA,
# bias) in that switch alone, plus the modern combination.
VARIANTS = {
    "learned": {},
    "sinusoidal": dict(position_embedding_type="sinusoidal"),
    "rope": dict(position_embedding_type="rope", rope_theta=500.0),
    "rmsnorm": dict(norm_type="rmsnorm"),
    "post-norm": dict(norm_position="post"),
    "gelu": dict(hidden_act="gelu"),
    "relu": dict(hidden_act="relu"),
    "swiglu": dict(hidden_act="swiglu"),
    "untied": dict(tie_word_embeddings=False),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "no-bias": dict(bias=False),
    "dropout": dict(embedding_dropout=0.1, attention_dropout=0.1, residual_dropout=0.1),
    "modern": dict(position_embedding_type="rope", norm_type="rmsnorm", hidden_act="swiglu", num_key_value_heads=2,
                   bias=False),
    "classic": dict(position_embedding_type="sinusoidal", norm_position="post", hidden_act="relu",
                    tie_word_embeddings=False),
}
# The three architectures every transformers contract is checked on: GPT-2's (the default), the modern one and the
# original Transformer's.
ARCHITECTURES = {name: VARIANTS[key] for name, key in (("default", "learned"), ("modern", "modern"),
                                                        ("classic", "classic"))}


def make_model(seed=0, cls=HFGPTForCausalLM, **overrides):
    torch.manual_seed(seed)
    return cls(HFGPTConfig.from_preset("tiny", **overrides)).eval()


def random_ids(batch, length, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", VARIANTS)
def test_switch_forward_overfit_and_cache_parity(name):
    model = make_model(**VARIANTS[name])
    ids = random_ids(4, 16)

    out = model(ids, labels=ids)
    assert out.logits.shape == (4, 16, VOCAB)
    assert torch.isfinite(out.loss)

    # the variant learns: overfitting one batch cuts the loss by more than half
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = model(ids, labels=ids).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first, (first, loss.item())

    # a KV cache changes nothing: greedy decoding with and without it gives the same tokens
    model.eval()
    prompt = random_ids(2, 5, seed=2)
    with_cache = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    without = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(with_cache, without)


def test_switches_build_the_layers_they_name():
    model = make_model(**VARIANTS["modern"])
    block = model.transformer.h[0]
    assert type(block.ln_1).__name__ == "HFGPTRMSNorm"
    assert hasattr(block.mlp, "gate_proj")
    assert block.attn.k_proj.out_features == 2 * model.config.head_dim
    assert block.attn.q_proj.bias is None
    assert model.transformer.wpe is None and model.transformer.rotary_emb is not None
    assert not any("inv_freq" in key for key in model.state_dict())  # fixed tables are not saved

    untied = make_model(tie_word_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()
    tied = make_model()
    assert tied.lm_head.weight.data_ptr() == tied.transformer.wte.weight.data_ptr()
    post = make_model(norm_position="post")
    assert isinstance(post.transformer.ln_f, torch.nn.Identity)


@pytest.mark.parametrize("name", ["learned", "sinusoidal", "rope", "modern"])
def test_eager_and_sdpa_agree(name):
    model = make_model(**VARIANTS[name])
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    model.set_attn_implementation("sdpa")
    sdpa = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("eager")
    eager = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(sdpa[1], eager[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa[0, 4:], eager[0, 4:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["learned", "rope", "modern"])
def test_left_padded_batch_generates_like_each_row_alone(name):
    model = make_model(**VARIANTS[name])
    rows = [random_ids(1, 7, seed=3)[0], random_ids(1, 4, seed=4)[0]]
    pad = 0
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=6, do_sample=False, pad_token_id=pad)
        assert torch.equal(batch[i, width:], alone[0, len(row):])


def test_static_cache_matches_dynamic_cache():
    model = make_model(**VARIANTS["modern"])
    prompt = random_ids(2, 6)
    dynamic = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    static = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_manual_decode_with_cache_objects_matches_full_forward():
    for overrides in ({}, VARIANTS["modern"]):
        model = make_model(**overrides)
        ids = random_ids(1, 10)
        full = model(ids, use_cache=False).logits
        for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=16)):
            out = model(ids[:, :6], cache=cache, use_cache=True)
            steps = [out.logits]
            for t in range(6, 10):
                out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
                steps.append(out.logits)
            torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_pre_5_24_past_key_values_name_still_feeds_the_cache():
    # transformers 5.24 renamed past_key_values -> cache; code written for the old name must keep decoding right
    model = make_model()
    ids = random_ids(1, 8)
    full = model(ids, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    model(ids[:, :7], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 7
    last = model(ids[:, 7:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(last[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


def test_generation_modes():
    model = make_model()
    prompt = random_ids(1, 4)

    torch.manual_seed(0)
    sample_a = model.generate(prompt, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=10,
                              pad_token_id=0)
    torch.manual_seed(0)
    sample_b = model.generate(prompt, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=10,
                              pad_token_id=0)
    assert torch.equal(sample_a, sample_b) and sample_a.shape == (1, 14)

    # top_k=1 sampling is greedy decoding
    greedy = model.generate(prompt, do_sample=False, max_new_tokens=10, pad_token_id=0)
    top1 = model.generate(prompt, do_sample=True, top_k=1, max_new_tokens=10, pad_token_id=0)
    assert torch.equal(greedy, top1)

    beams = model.generate(prompt, num_beams=3, num_return_sequences=3, do_sample=False, max_new_tokens=6,
                           output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    assert beams.sequences.shape == (3, 10)
    assert beams.sequences_scores[0] >= beams.sequences_scores[-1]

    # a random tiny model repeats itself; a strong repetition penalty forbids reusing any token
    penalised = model.generate(prompt, do_sample=False, max_new_tokens=10, repetition_penalty=1e6, pad_token_id=0)
    new = penalised[0].tolist()
    assert len(set(new)) == len(new)


def test_streamer_receives_every_generated_token():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    model = make_model()
    prompt = random_ids(1, 4)
    streamer = Collect()
    out = model.generate(prompt, max_new_tokens=7, do_sample=False, streamer=streamer, pad_token_id=0)
    streamed = [t for chunk in streamer.chunks for t in chunk]
    assert streamer.ended
    assert streamed == out[0].tolist()  # the prompt first, then each new token as it is made


def test_assisted_decoding_with_a_smaller_hfgpt_gives_the_main_models_greedy_output():
    model = make_model()
    assistant = HFGPTForCausalLM(HFGPTConfig.from_preset("tiny", num_hidden_layers=1, hidden_size=32)).eval()
    prompt = random_ids(1, 5)
    greedy = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assisted = model.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=assistant, pad_token_id=0)
    assert torch.equal(greedy, assisted)


@pytest.mark.parametrize("name", ["learned", "rope"])
def test_packed_documents_do_not_attend_to_each_other(name):
    model = make_model(**VARIANTS[name])
    docs = [random_ids(1, n, seed=n)[0] for n in (5, 7, 4)]
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    logits = model(packed, position_ids=position_ids).logits[0]
    start = 0
    for doc in docs:
        alone = model(doc[None]).logits[0]
        torch.testing.assert_close(logits[start:start + len(doc)], alone, atol=1e-5, rtol=1e-5)
        start += len(doc)
    # and in training mode (which is where packing is used) too
    model.train()
    model.config.embedding_dropout = 0.0
    out = model(packed, position_ids=position_ids, labels=packed)
    assert torch.isfinite(out.loss)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_ids(2, 12)
    grads = []
    for checkpointing in (False, True):
        model = make_model(**VARIANTS["modern"]).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_loss_counts_tokens_over_the_whole_accumulated_batch():
    model = make_model()
    ids = random_ids(2, 10)
    labels = ids.clone()
    labels[0, :5] = -100
    mean_loss = model(ids, labels=labels).loss
    summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(1000)).loss
    n_tokens = (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(summed, mean_loss * n_tokens / 1000)


def test_logits_to_keep():
    model = make_model()
    ids = random_ids(2, 10)
    full = model(ids).logits
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:])


def test_resize_token_embeddings_keeps_the_tie():
    model = make_model()
    model.resize_token_embeddings(VOCAB + 10)
    assert model.config.vocab_size == VOCAB + 10
    assert model.lm_head.weight.shape == (VOCAB + 10, 64)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model(random_ids(1, 4)).logits.shape[-1] == VOCAB + 10


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_hidden_states_and_attentions_are_captured_by_transformers_hooks(name):
    model = make_model(**ARCHITECTURES[name])
    model.set_attn_implementation("eager")
    ids = random_ids(2, 6)
    n_layers = model.config.num_hidden_layers
    out = model(ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == n_layers + 1
    assert len(out.attentions) == n_layers
    # the first is what enters the first block: token (+ position) embeddings
    body = model.transformer
    embeddings = body.wte(ids) + (body.wpe(torch.arange(6)[None]) if body.wpe is not None else 0)
    torch.testing.assert_close(out.hidden_states[0], embeddings)
    # then each block's output (checked against a copy cut after that block, without the final norm) ...
    for k in range(1, n_layers):
        cut = copy.deepcopy(body)
        cut.h, cut.ln_f = cut.h[:k], torch.nn.Identity()
        torch.testing.assert_close(out.hidden_states[k], cut(ids).last_hidden_state)
    # ... and last the final hidden state, after the final norm
    torch.testing.assert_close(out.hidden_states[-1], body(ids).last_hidden_state)
    for weights in out.attentions:
        assert weights.shape == (2, 4, 6, 6)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6))
        assert torch.all(weights.triu(1) == 0)  # causal: nothing attends to the future
    # transformers' capture also selects layers: only the asked-for hidden states are kept
    selected = model(ids, output_hidden_states=[0, -1]).hidden_states
    assert len(selected) == n_layers + 1 and all(h is None for h in selected[1:-1])
    torch.testing.assert_close(selected[0], out.hidden_states[0])
    torch.testing.assert_close(selected[-1], out.hidden_states[-1])
    # nothing is collected unless asked for, and return_dict=False gives the tuple
    plain = model(ids)
    assert plain.hidden_states is None and plain.attentions is None
    as_tuple = model(ids, output_hidden_states=True, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.logits)
    assert len(as_tuple[-1]) == n_layers + 1


def test_output_attentions_with_sdpa_does_what_transformers_models_do():
    # transformers' own models do not raise here: SDPA computes no weights, so none come back (with a warning)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4)).eval()
    model = make_model()
    assert model.config._attn_implementation == llama.config._attn_implementation == "sdpa"
    ids = random_ids(2, 6)
    ours = model(ids, output_attentions=True, output_hidden_states=True)
    theirs = llama(ids, output_attentions=True, output_hidden_states=True)
    assert type(ours.attentions) is type(theirs.attentions)
    assert len(ours.attentions) == len(theirs.attentions)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    torch.testing.assert_close(ours.logits, model(ids).logits)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_packed_row_longer_than_the_context(name):
    # what must fit the position table is each document's largest position, not the row
    model = make_model(max_position_embeddings=16, **ARCHITECTURES[name])
    docs = [random_ids(1, n, seed=n)[0] for n in (10, 9, 12)]  # 31 tokens, none past position 11
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    logits = model(packed, position_ids=position_ids).logits[0]
    start = 0
    for doc in docs:
        torch.testing.assert_close(logits[start:start + len(doc)], model(doc[None]).logits[0], atol=1e-5, rtol=1e-5)
        start += len(doc)
    model.train()
    assert torch.isfinite(model(packed, position_ids=position_ids, labels=packed).loss)
    model.eval()
    # a position that really is off the table is still a clear error (rotary positions have no table)
    if model.transformer.wpe is not None:
        with pytest.raises(ValueError, match="reaches position 17.*max_position_embeddings=16"):
            model(random_ids(1, 4), position_ids=torch.arange(14, 18)[None])
    else:
        assert model(random_ids(1, 4), position_ids=torch.arange(14, 18)[None]).logits.shape == (1, 4, VOCAB)


def test_input_longer_than_learned_positions_is_a_clear_error():
    model = make_model(max_position_embeddings=16)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(random_ids(1, 17))
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model.generate(random_ids(1, 10), max_new_tokens=10, do_sample=False, pad_token_id=0)
    rope = make_model(max_position_embeddings=16, position_embedding_type="rope")
    assert rope(random_ids(1, 17)).logits.shape == (1, 17, VOCAB)  # rotary positions extrapolate


ROPE_SCALINGS = {
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=4.0),
    "llama3": dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8),
}


@pytest.mark.parametrize("scaling", ["default", *ROPE_SCALINGS])
def test_rope_frequencies_are_transformers_own_as_in_llama(scaling):
    rope_parameters = dict(ROPE_SCALINGS.get(scaling, dict(rope_type="default")), rope_theta=500.0)
    ours = HFGPTRotaryEmbedding(HFGPTConfig.from_preset("modern-tiny", max_position_embeddings=16,
                                                        rope_parameters=rope_parameters))
    llama = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=16,
                                             rope_parameters=dict(rope_parameters)))
    x = torch.zeros(1)
    for length in (10, 50, 10):  # past the trained context and back: dynamic grows its table, then resets it
        positions = torch.arange(length)[None]
        for a, b in zip(ours(x, positions), llama(x, positions)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_rope_scaling_runs_a_saved_model_past_its_context(tmp_path):
    model = make_model(max_position_embeddings=16, **dict(VARIANTS["modern"], rope_theta=500.0))
    model.save_pretrained(tmp_path)
    ids = random_ids(1, 12)
    ones = torch.ones_like(ids)  # a mask, so the stretched positions below are not read as packed documents
    plain = model(ids, attention_mask=ones).logits
    # linear scaling by 2 is position interpolation: position 2p of the scaled model is position p of the original
    linear = HFGPTForCausalLM.from_pretrained(tmp_path, rope_parameters=ROPE_SCALINGS["linear"]).eval()
    assert linear.config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    stretched = linear(ids, attention_mask=ones, position_ids=2 * torch.arange(12)[None]).logits
    torch.testing.assert_close(stretched, plain, atol=1e-5, rtol=1e-5)
    # dynamic NTK scaling leaves the trained context alone and changes only what lies past it
    dynamic = HFGPTForCausalLM.from_pretrained(tmp_path, rope_parameters=ROPE_SCALINGS["dynamic"]).eval()
    torch.testing.assert_close(dynamic(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-6)
    long = random_ids(1, 40)
    assert not torch.allclose(dynamic(long).logits, model(long).logits, atol=1e-4)
    for scaling in ("yarn", "llama3"):
        scaled = HFGPTForCausalLM.from_pretrained(tmp_path, rope_parameters=ROPE_SCALINGS[scaling]).eval()
        assert not torch.allclose(scaled(ids).logits, plain, atol=1e-4)
        # generating well past the trained context of 16 tokens, with the cache, as without it
        prompt = random_ids(1, 6)
        cached = scaled.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0)
        uncached = scaled.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0, use_cache=False)
        assert cached.shape == (1, 46) and torch.equal(cached, uncached)


def test_base_model_returns_hidden_states():
    torch.manual_seed(0)
    model = HFGPTModel(HFGPTConfig.from_preset("tiny")).eval()
    out = model(random_ids(2, 5))
    assert out.last_hidden_state.shape == (2, 5, 64)


class TestSequenceClassification:
    def model(self, pad_token_id=0, pooling="last"):
        return make_model(cls=HFGPTForSequenceClassification, num_labels=3, pad_token_id=pad_token_id,
                          classifier_pooling=pooling)

    @pytest.mark.parametrize("pooling", ["last", "mean"])
    def test_pools_the_real_tokens_whatever_the_padding(self, pooling):
        model = self.model(pooling=pooling)
        row = random_ids(1, 6)
        alone = model(row).logits
        pad = torch.zeros(1, 3, dtype=torch.long)
        right = torch.cat([torch.cat([row, pad], 1), random_ids(1, 9, seed=5)])
        right_mask = torch.ones_like(right)
        right_mask[0, 6:] = 0
        torch.testing.assert_close(model(right, attention_mask=right_mask).logits[:1], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(right).logits[:1], alone, atol=1e-5, rtol=1e-5)  # found via pad_token_id
        left = torch.cat([torch.cat([pad, row], 1), random_ids(1, 9, seed=5)])
        left_mask = torch.ones_like(left)
        left_mask[0, :3] = 0
        position_ids = (left_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(left, attention_mask=left_mask, position_ids=position_ids).logits
        torch.testing.assert_close(logits[:1], alone, atol=1e-5, rtol=1e-5)

    def test_mean_pooling_averages_the_real_tokens_hidden_states(self):
        model = self.model(pooling="mean")
        ids, mask = random_ids(2, 7), torch.ones(2, 7, dtype=torch.long)
        mask[0, 4:] = 0
        with torch.no_grad():
            hidden = model.transformer(ids, attention_mask=mask).last_hidden_state
            expected = torch.stack([hidden[0, :4].mean(0), hidden[1].mean(0)])
            torch.testing.assert_close(model(ids, attention_mask=mask).logits, model.score(expected))
            last = model.score(torch.stack([hidden[0, 3], hidden[1, 6]]))
        assert not torch.allclose(model.score(expected), last)

    def test_unknown_pooling_is_a_clear_error(self):
        with pytest.raises(ValueError, match="classifier_pooling='max' is not supported; choose one of 'last', 'mean'"):
            HFGPTConfig.from_preset("tiny", classifier_pooling="max")

    def test_loss_and_training(self):
        model = self.model().train()
        ids = random_ids(4, 8)
        labels = torch.tensor([0, 1, 2, 1])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(20):
            loss = model(ids, labels=labels).loss
            losses.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert losses[-1] < 0.2 * losses[0]

    def test_batch_without_pad_token_or_mask_is_a_clear_error(self):
        model = self.model(pad_token_id=None)
        assert model(random_ids(1, 5)).logits.shape == (1, 3)
        with pytest.raises(ValueError, match="pad_token_id"):
            model(random_ids(2, 5))


def test_flex_attention_agrees_with_eager_in_inference():
    # flex attention runs on CPU for inference only (no backward there); on GPU it trains too
    model = make_model(**VARIANTS["modern"])
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("flex_attention")
        assert model.config._attn_implementation == "flex_attention"
        flex = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(flex[1], eager[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex[0, 3:], eager[0, 3:], atol=1e-5, rtol=1e-5)


class TestTokenClassificationAndQuestionAnswering:
    """transformers' generic heads on hfgpt's stack, as Llama has them."""

    @pytest.mark.parametrize("name", ARCHITECTURES)
    def test_token_classification_labels_every_token_and_learns(self, name):
        model = make_model(cls=HFGPTForTokenClassification, num_labels=3, **ARCHITECTURES[name])
        assert isinstance(model.transformer, HFGPTModel)
        ids = random_ids(4, 8)
        logits = model(ids).logits
        assert logits.shape == (4, 8, 3)
        # causal: a token's label is read from what it has seen, so later tokens do not change it
        changed = ids.clone()
        changed[:, 5:] = random_ids(4, 3, seed=9)
        torch.testing.assert_close(model(changed).logits[:, :5], logits[:, :5])
        # learns a rule it can see: the label is the token id modulo 3 (ignored positions: -100)
        labels = ids % 3
        labels[0, :2] = -100
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(40):
            loss = model(ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        predicted = model(ids).logits.argmax(-1)
        assert torch.equal(predicted[labels != -100], labels[labels != -100])

    @pytest.mark.parametrize("name", ARCHITECTURES)
    def test_question_answering_points_at_a_span_and_learns(self, name):
        model = make_model(cls=HFGPTForQuestionAnswering, **ARCHITECTURES[name])
        assert model.get_input_embeddings() is model.transformer.wte
        ids = random_ids(4, 10)
        # the answer is the token after the marker token 1 through the one after marker 2
        starts, ends = torch.tensor([2, 4, 1, 5]), torch.tensor([4, 7, 3, 8])
        ids[torch.arange(4), starts - 1] = 1
        ids[torch.arange(4), ends - 1] = 2
        out = model(ids, start_positions=starts, end_positions=ends)
        assert out.start_logits.shape == out.end_logits.shape == (4, 10)
        first = out.loss.item()
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(40):
            loss = model(ids, start_positions=starts, end_positions=ends).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        out = model(ids)
        assert loss.item() < 0.2 * first
        assert torch.equal(out.start_logits.argmax(-1), starts) and torch.equal(out.end_logits.argmax(-1), ends)

"""Byte-level BPE training, special tokens, save/load and the chat template with its assistant mask."""

import random

import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, GPT2Tokenizer

from hfgpt import HFGPTConfig
from hfgpt.tokenization import (
    CHAT_TEMPLATE,
    DEFAULT_SPECIAL_TOKENS,
    ENDOFTEXT_TOKEN,
    NUM_BYTE_SYMBOLS,
    PAD_TOKEN,
    ROLE_TOKENS,
    add_chat_template,
    check_chat_template,
    special_token_ids,
    train_tokenizer,
)

TRICKY_TEXTS = [
    "",
    " ",
    "   leading and trailing   ",
    "multiple    spaces\tand\ttabs\n\nand newlines\r\n",
    "\n",
    "emoji 👍🏽 family 👨‍👩‍👧‍👦 flag 🇺🇦",
    "中文和日本語の文章、한국어",
    "combining e\u0301 vs é, a\u0308\u0323, Z\u0351\u0337a\u0362l\u0340g\u0358o",
    "right-to-left: مرحبا بالعالم שלום",
    "zero width\u200bjoiner\u200d and BOM \ufeff and NUL \x00 and DEL \x7f",
    "astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 🀄",
    "punctuation , . ! ? ' s 're n't ... -- \"quoted\"",
    f"text with {ENDOFTEXT_TOKEN} inside and {ROLE_TOKENS['user']} too",
    "   ",
    "ends with a space ",
]


def random_unicode_text(rng: random.Random, max_length: int = 40) -> str:
    """Code points from every plane (surrogates excluded: they are not text), mixed with runs of whitespace."""
    pieces = []
    for _ in range(rng.randint(0, max_length)):
        kind = rng.random()
        if kind < 0.2:
            pieces.append(rng.choice([" ", "  ", "\n", "\t", "\r\n", " \n "]))
        elif kind < 0.5:
            pieces.append(chr(rng.randint(0x20, 0x7E)))
        elif kind < 0.8:
            pieces.append(chr(rng.choice([rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0xFFFF)])))
        else:
            pieces.append(chr(rng.randint(0x10000, 0x10FFFF)))
    return "".join(pieces)


def masked_runs(input_ids, mask):
    """The contiguous runs of ids whose mask is 1."""
    runs, current = [], []
    for token_id, flag in zip(input_ids, mask):
        if flag:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Who sells the red house?"},
    {"role": "assistant", "content": "The baker sells it."},
    {"role": "user", "content": "  And then?\n"},
    # content with edge whitespace and newlines: the mask must still match it exactly
    {"role": "assistant", "content": " Then the cat\n\nfinds a map. "},
]


# --- special tokens and vocabulary ---------------------------------------------------------------------------


def test_special_tokens_have_low_stable_ids(tiny_tokenizer):
    ids = tiny_tokenizer.convert_tokens_to_ids(list(DEFAULT_SPECIAL_TOKENS))
    assert ids == list(range(len(DEFAULT_SPECIAL_TOKENS)))
    assert tiny_tokenizer.eos_token == tiny_tokenizer.bos_token == ENDOFTEXT_TOKEN
    assert tiny_tokenizer.pad_token == PAD_TOKEN
    assert tiny_tokenizer.unk_token is None  # byte-level: nothing is unknown
    assert special_token_ids(tiny_tokenizer) == {
        "bos_token_id": tiny_tokenizer.convert_tokens_to_ids(ENDOFTEXT_TOKEN),
        "eos_token_id": tiny_tokenizer.convert_tokens_to_ids(ENDOFTEXT_TOKEN),
        "pad_token_id": tiny_tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    }
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    assert set(tiny_tokenizer.extra_special_tokens) == set(ROLE_TOKENS.values())
    # special tokens are atomic in text; raw text starts with BOS, as every pretraining document does
    assert tiny_tokenizer(ENDOFTEXT_TOKEN + PAD_TOKEN, add_special_tokens=False)["input_ids"] == [
        tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id]
    assert tiny_tokenizer("the cat")["input_ids"] == [tiny_tokenizer.bos_token_id] + tiny_tokenizer.encode(
        "the cat", add_special_tokens=False)
    assert "token_type_ids" not in tiny_tokenizer("the cat")


def test_extra_special_tokens_follow_the_defaults(tiny_corpus):
    tokenizer = train_tokenizer(iter(tiny_corpus), vocab_size=300, special_tokens=["<|tool|>", "<|end|>", PAD_TOKEN],
                                show_progress=False)
    n = len(DEFAULT_SPECIAL_TOKENS)
    assert tokenizer.convert_tokens_to_ids(["<|tool|>", "<|end|>"]) == [n, n + 1]
    assert tokenizer.convert_tokens_to_ids(PAD_TOKEN) == DEFAULT_SPECIAL_TOKENS.index(PAD_TOKEN)  # not duplicated
    assert {"<|tool|>", "<|end|>"} <= set(tokenizer.extra_special_tokens)
    assert len(tokenizer) == 300


def test_vocab_size_and_byte_alphabet(tiny_tokenizer, tiny_corpus):
    tiny = HFGPTConfig.from_preset("tiny", **special_token_ids(tiny_tokenizer))
    assert len(tiny_tokenizer) == tiny.vocab_size  # the corpus has enough pairs to fill the vocabulary exactly
    vocab = tiny_tokenizer.get_vocab()
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)  # every byte, including ones absent from the text
    assert len(pre_tokenizers.ByteLevel.alphabet()) == NUM_BYTE_SYMBOLS
    assert max(vocab.values()) == len(tiny_tokenizer) - 1
    for vocab_size in (NUM_BYTE_SYMBOLS + len(DEFAULT_SPECIAL_TOKENS), 300):
        assert len(train_tokenizer(iter(tiny_corpus), vocab_size=vocab_size, show_progress=False)) == vocab_size
    # a corpus too small for the requested size gives fewer tokens, never more
    small = train_tokenizer(iter(["ab ab ab"]), vocab_size=1000, show_progress=False)
    assert NUM_BYTE_SYMBOLS + len(DEFAULT_SPECIAL_TOKENS) < len(small) < 1000


def test_min_frequency_limits_merges():
    texts = ["qq " * 2 + "zz " * 5]
    rare_kept = train_tokenizer(iter(texts), vocab_size=400, min_frequency=2, show_progress=False).get_vocab()
    rare_dropped = train_tokenizer(iter(texts), vocab_size=400, min_frequency=3, show_progress=False).get_vocab()
    assert "qq" in rare_kept and "Ġzz" in rare_kept
    assert "qq" not in rare_dropped and "Ġzz" in rare_dropped


# --- exact round trip ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_decode_encode_is_identity_on_tricky_text(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.encode(text) == [tiny_tokenizer.bos_token_id] + ids


def test_decode_encode_is_identity_on_random_unicode(tiny_tokenizer):
    rng = random.Random(1234)
    texts = [random_unicode_text(rng) for _ in range(2000)]
    batch = tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, batch):
        assert tiny_tokenizer.decode(ids) == text, repr(text)
    # merges were learned on English-like text, so some of these ids are merges, not just bytes
    english = tiny_tokenizer.encode("The old sailor remembers the garden at night.", add_special_tokens=False)
    assert len(english) < len("The old sailor remembers the garden at night.") / 2
    assert tiny_tokenizer.decode(english) == "The old sailor remembers the garden at night."


# --- training sources ----------------------------------------------------------------------------------------


def test_train_from_files_and_iterator(tmp_path, tiny_corpus):
    # a word that appears only in the files: learning it as one token proves the files were read
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("".join(tiny_corpus[:120]) + "xylophone " * 50, encoding="utf-8")
    second.write_text("".join(tiny_corpus[120:]), encoding="utf-8")
    from_list = train_tokenizer([first, str(second)], vocab_size=400, show_progress=False)
    from_one_path = train_tokenizer(str(first), vocab_size=400, show_progress=False)
    from_texts = train_tokenizer((line for line in tiny_corpus), vocab_size=400, show_progress=False)
    from_batches = train_tokenizer(iter([tiny_corpus[:100], tiny_corpus[100:]]), vocab_size=400, show_progress=False)
    for tokenizer in (from_list, from_one_path):
        xylophone = tokenizer.convert_tokens_to_ids("Ġxylophone")
        assert tokenizer.encode(" xylophone", add_special_tokens=False) == [xylophone]
    assert "Ġxylophone" not in from_texts.get_vocab()
    # the same lines given one by one or in batches train the same tokenizer
    assert from_batches.get_vocab() == from_texts.get_vocab()
    for tokenizer in (from_list, from_one_path, from_texts):
        assert tokenizer.decode(tokenizer.encode(TRICKY_TEXTS[5], add_special_tokens=False)) == TRICKY_TEXTS[5]


def test_save_and_autotokenizer_load_round_trip(tmp_path, tiny_corpus):
    tokenizer = train_tokenizer(iter(tiny_corpus), vocab_size=400, special_tokens=["<|tool|>"], show_progress=False,
                                model_max_length=128)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert special_token_ids(loaded) == special_token_ids(tokenizer)
    assert set(loaded.extra_special_tokens) == set(tokenizer.extra_special_tokens)
    assert loaded.chat_template == CHAT_TEMPLATE
    assert loaded.model_max_length == 128
    assert loaded.clean_up_tokenization_spaces is False
    texts = TRICKY_TEXTS + tiny_corpus[:20]
    assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]  # BOS first in both
    for text in texts:
        assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    assert (loaded.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True, return_dict=True)
            == tokenizer.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True, return_dict=True))


# --- chat template ---------------------------------------------------------------------------------------------


def test_chat_template_renders_each_turn(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token
    expected = "".join(ROLE_TOKENS[m["role"]] + m["content"] + eos for m in CONVERSATION)
    assert tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == expected
    with_prompt = tiny_tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert with_prompt == "".join(ROLE_TOKENS[m["role"]] + m["content"] + eos for m in CONVERSATION[:4]) + \
        ROLE_TOKENS["assistant"]
    ids = tiny_tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, return_dict=False)
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids(ROLE_TOKENS["system"])
    assert ids[-1] == tiny_tokenizer.convert_tokens_to_ids(ROLE_TOKENS["assistant"])
    # a finished conversation ends on the EOS id, which is what generate() stops at
    assert tiny_tokenizer.apply_chat_template(CONVERSATION, return_dict=False)[-1] == tiny_tokenizer.eos_token_id


def test_assistant_mask_covers_exactly_assistant_content_and_eos(tiny_tokenizer):
    out = tiny_tokenizer.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True, return_dict=True)
    runs = masked_runs(out["input_ids"], out["assistant_masks"])
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tiny_tokenizer.decode(run) for run in runs] == [reply + tiny_tokenizer.eos_token for reply in replies]
    assert all(run[-1] == tiny_tokenizer.eos_token_id for run in runs)
    # the unmasked rest is everything else: system, user turns and the assistant headers
    unmasked = [i for i, flag in zip(out["input_ids"], out["assistant_masks"]) if not flag]
    assert unmasked.count(tiny_tokenizer.convert_tokens_to_ids(ROLE_TOKENS["assistant"])) == len(replies)
    assert sum(out["assistant_masks"]) + len(unmasked) == len(out["input_ids"])


def test_assistant_mask_batched_and_empty_reply(tiny_tokenizer):
    conversations = [CONVERSATION[1:3], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]]
    out = tiny_tokenizer.apply_chat_template(conversations, return_assistant_tokens_mask=True, return_dict=True)
    decoded = [[tiny_tokenizer.decode(run) for run in masked_runs(ids, mask)]
               for ids, mask in zip(out["input_ids"], out["assistant_masks"])]
    eos = tiny_tokenizer.eos_token
    assert decoded == [[CONVERSATION[2]["content"] + eos], [eos]]


def test_trl_sees_a_training_ready_template(tiny_tokenizer):
    from trl.chat_template_utils import get_training_chat_template, is_chat_template_stop_token_trained

    assert get_training_chat_template(tiny_tokenizer) is None  # None: SFTTrainer uses the template unpatched
    assert is_chat_template_stop_token_trained(tiny_tokenizer)


def test_chat_template_rejects_unknown_roles_and_non_text(tiny_tokenizer):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="Unknown chat role tool.*system, user and assistant"):
        tiny_tokenizer.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)
    with pytest.raises(TemplateError, match="content of a user message must be a string"):
        tiny_tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                           tokenize=False)


def gpt2_style_tokenizer(tiny_tokenizer):
    """A GPT-2 tokenizer (as a converted GPT-2 ships) from a plain vocab: no role tokens, no chat template."""
    vocab = {token: i for token, i in tiny_tokenizer.get_vocab().items() if token not in DEFAULT_SPECIAL_TOKENS}
    vocab = {token: i for i, token in enumerate(sorted(vocab, key=vocab.get))}
    vocab[ENDOFTEXT_TOKEN] = len(vocab)  # GPT-2 keeps it last
    return GPT2Tokenizer(vocab=vocab, merges=[])


def test_add_chat_template_to_a_gpt2_tokenizer(tiny_tokenizer, tmp_path):
    tokenizer = gpt2_style_tokenizer(tiny_tokenizer)
    assert tokenizer.chat_template is None
    size = len(tokenizer)
    with pytest.raises(ValueError, match="has no chat template.*add_chat_template"):
        check_chat_template(tokenizer)

    assert add_chat_template(tokenizer) == len(ROLE_TOKENS)
    assert len(tokenizer) == size + len(ROLE_TOKENS)
    assert add_chat_template(tokenizer) == 0  # idempotent
    check_chat_template(tokenizer, assistant_masks=True)

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    out = loaded.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True, return_dict=True)
    replies = [m["content"] + loaded.eos_token for m in CONVERSATION if m["role"] == "assistant"]
    assert [loaded.decode(run) for run in masked_runs(out["input_ids"], out["assistant_masks"])] == replies
    assert loaded.convert_tokens_to_ids(ROLE_TOKENS["user"]) >= size  # new tokens: the model needs resizing


def test_check_chat_template_wants_generation_markers(tiny_tokenizer):
    tokenizer = gpt2_style_tokenizer(tiny_tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    check_chat_template(tokenizer)  # a template is there
    with pytest.raises(ValueError, match="no \\{% generation %\\} block"):
        check_chat_template(tokenizer, assistant_masks=True)
    check_chat_template(tiny_tokenizer, assistant_masks=True)


def test_add_chat_template_needs_an_eos_token(tiny_tokenizer):
    tokenizer = gpt2_style_tokenizer(tiny_tokenizer)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        add_chat_template(tokenizer)


def test_tokenizer_feeds_the_tiny_model(tiny_tokenizer):
    import torch

    from hfgpt import HFGPTForCausalLM

    config = HFGPTConfig.from_preset("tiny", **special_token_ids(tiny_tokenizer))
    torch.manual_seed(0)
    model = HFGPTForCausalLM(config).eval()
    batch = tiny_tokenizer.apply_chat_template([CONVERSATION, CONVERSATION[:3]], return_dict=True, padding=True,
                                               return_tensors="pt")
    assert (batch["input_ids"][1] == config.pad_token_id).any()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, config.vocab_size)


# --- bad input -------------------------------------------------------------------------------------------------


def test_errors_for_bad_input(tmp_path, tiny_corpus):
    smallest = NUM_BYTE_SYMBOLS + len(DEFAULT_SPECIAL_TOKENS)
    with pytest.raises(ValueError, match=f"vocab_size=260 is too small.*>= {smallest}"):
        train_tokenizer(iter(tiny_corpus), vocab_size=260)
    with pytest.raises(ValueError, match=f">= {smallest + 1}"):
        train_tokenizer(iter(tiny_corpus), vocab_size=smallest, special_tokens=["<|tool|>"])
    with pytest.raises(ValueError, match="min_frequency=-1"):
        train_tokenizer(iter(tiny_corpus), vocab_size=300, min_frequency=-1)
    with pytest.raises(ValueError, match="model_max_length=0"):
        train_tokenizer(iter(tiny_corpus), vocab_size=300, model_max_length=0)
    with pytest.raises(TypeError, match="wrap it"):
        train_tokenizer(iter(tiny_corpus), vocab_size=300, special_tokens="<|tool|>")

    with pytest.raises(ValueError, match="No training files"):
        train_tokenizer([], vocab_size=300)
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt.*not found"):
        train_tokenizer(missing, vocab_size=300)
    with pytest.raises(FileNotFoundError, match="a directory"):
        train_tokenizer([tmp_path], vocab_size=300)
    with pytest.raises(FileNotFoundError, match=r"iter\(texts\)"):  # a list of strings is read as paths
        train_tokenizer(["the cat sees the dog"], vocab_size=300)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="corpus is empty"):
        train_tokenizer([empty], vocab_size=300)

    with pytest.raises(ValueError, match="gave no text"):
        train_tokenizer(iter([]), vocab_size=300, show_progress=False)
    with pytest.raises(ValueError, match="gave no text"):
        train_tokenizer(iter(["", ""]), vocab_size=300, show_progress=False)
    with pytest.raises(TypeError, match="gave dict.*row\\['text'\\]"):
        train_tokenizer(iter([{"text": "the cat"}]), vocab_size=300, show_progress=False)
    with pytest.raises(TypeError, match="iterable of strings; got int"):
        train_tokenizer(42, vocab_size=300)

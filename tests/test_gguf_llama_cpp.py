"""The GGUF export checked by the real client: llama.cpp itself, through llama-cpp-python, loads the exported file and
must tokenize, score, decode greedily and render the chat template as hfgpt does, for both architectures the export
writes (llama: RoPE/RMSNorm/SwiGLU/GQA; gpt2: learned positions/LayerNorm/GELU).

The models are tiny but trained for a few seconds on the fixture corpus, so their next-token distributions are peaked
like a real model's and a greedy continuation is a meaningful check (a random model's near-ties would make it a coin
toss at f16).

Tolerances on the logits, for max |logit| about 11 (the largest difference measured over the texts in brackets):
- f32 weights, f32 KV cache, llama: 1e-4 [5e-6]. The same arithmetic in another order: float32 rounding only.
- f32 weights, f32 KV cache, gpt2: 1e-2 [1.3e-3]. ggml evaluates GELU through a float16 lookup table (relative error
  ~2^-11 per activation), which the LayerNorms and the lm_head carry into the logits.
- f32 weights with llama.cpp's default f16 KV cache: 3e-2 [5e-3]. Keys and values are rounded to float16.
- f16 weights: 3e-2 [6.2e-3]. Weights and, in ggml's f16 matmul, activations are rounded to float16.
- q8_0 weights: 0.6 [0.14]. Blocks of 32 weights share one scale at 8 bits each (relative error up to 1/254 per
  weight), summed over 64-wide dot products in every layer; greedy tokens are not compared at q8_0.
A layout mistake is far above all of these: leaving the q/k rows of the llama export in transformers' order moves the
f32 logits by 3.3.
"""

import gc
import os

import numpy as np
import pytest
import torch

from hfgpt import HFGPTConfig, HFGPTForCausalLM
from hfgpt.chat import Chat
from hfgpt.convert.export import export
from hfgpt.tokenization import special_token_ids

try:
    import llama_cpp
except ImportError:  # .ci/run installs it (the llama-cpp extra) and sets HFGPT_REQUIRE_LLAMA_CPP: there it must run
    if os.environ.get("HFGPT_REQUIRE_LLAMA_CPP"):
        raise
    pytest.skip("llama-cpp-python is not installed: pip install -e '.[llama-cpp]' (builds llama.cpp, minutes)",
                allow_module_level=True)

pytestmark = pytest.mark.slow

ARCHITECTURES = {"llama": "modern-tiny", "gpt2": "tiny"}
TOLERANCE = {("llama", "f32", "f32"): 1e-4, ("gpt2", "f32", "f32"): 1e-2, "f32": 3e-2, "f16": 3e-2, "q8_0": 0.6}
F32 = 0  # ggml_type GGML_TYPE_F32, for the KV cache

TEXTS = [
    "Hello world",
    "The old sailor finds three apples.",
    "  leading spaces and   runs of   spaces  ",
    "line one\nline two\n\n\nthree newlines\r\nand a CRLF",
    "tabs\tand\t\ttabs",
    "emoji 🙂 and 👍🏽 and 🇫🇷 flags",
    "café naïve Tōkyō Émile ß 北京 ☃",
    "it's they're we'll I'd you've",
    "numbers 1234567 3.14159 and 42nd",
    "<|user|>Hi<|endoftext|><|assistant|>Hello<|endoftext|>",
    "text<|pad|>with <|system|> specials inside",
    "symbols !@#$%^&*()_+-=[]{}|;:',.<>/?`~",
    " ",
    "\n",
    "",
]
PROMPTS = ["The old sailor", "Yesterday my neighbour", '"A map of Tōkyō," said']


def train_(model: HFGPTForCausalLM, ids: torch.Tensor, steps: int = 150, length: int = 64) -> HFGPTForCausalLM:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - length, (16,), generator=generator)
        batch = torch.stack([ids[start:start + length] for start in starts])
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer, tiny_corpus):
    """architecture -> (model directory, model)."""
    ids = torch.tensor(tiny_tokenizer("".join(tiny_corpus))["input_ids"])
    out = {}
    for architecture, preset in ARCHITECTURES.items():
        torch.manual_seed(0)
        config = HFGPTConfig.from_preset(preset, **special_token_ids(tiny_tokenizer))
        model = train_(HFGPTForCausalLM(config), ids)
        path = tmp_path_factory.mktemp(architecture) / "model"
        model.save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        out[architecture] = (path, model)
    return out


@pytest.fixture(scope="module")
def llama_cpp_model(trained, tmp_path_factory):
    """(architecture, dtype, kv cache type) -> the exported file loaded by llama.cpp; closed at the end."""
    loaded = {}

    def load(architecture: str, dtype: str, kv: str = "f16") -> "llama_cpp.Llama":
        key = (architecture, dtype, kv)
        if key not in loaded:
            path = tmp_path_factory.mktemp("gguf") / f"{architecture}-{dtype}.gguf"
            export(trained[architecture][0], path, "gguf", dtype=dtype)
            cache = dict(type_k=F32, type_v=F32) if kv == "f32" else {}
            loaded[key] = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, n_threads=1, seed=0, verbose=False,
                                          **cache)
        return loaded[key]

    yield load
    for model in loaded.values():
        model.close()
    gc.collect()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_llama_cpp_tokenizes_like_hfgpt(llama_cpp_model, tiny_tokenizer, architecture):
    llm = llama_cpp_model(architecture, "f32")
    for text in TEXTS:
        expected = tiny_tokenizer(text)["input_ids"]  # BOS (<|endoftext|>) first, special tokens parsed
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == expected, text
        # and back: llama.cpp's pieces are the original bytes (special tokens are rendered as their text)
        assert llm.detokenize(expected[1:], special=True) == text.encode(), text


def _reference_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize(
    "architecture, dtype, kv",
    [("llama", "f32", "f32"), ("gpt2", "f32", "f32"), ("llama", "f32", "f16"), ("gpt2", "f32", "f16"),
     ("llama", "f16", "f16"), ("gpt2", "f16", "f16"), ("llama", "q8_0", "f16"), ("gpt2", "q8_0", "f16")],
)
def test_llama_cpp_logits_match_hfgpt(llama_cpp_model, trained, tiny_tokenizer, architecture, dtype, kv):
    llm, model = llama_cpp_model(architecture, dtype, kv), trained[architecture][1]
    tolerance = TOLERANCE.get((architecture, dtype, kv), TOLERANCE[dtype])
    chat = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Where is the red house?"}],
                                              add_generation_prompt=True, tokenize=False)
    for text in [*PROMPTS, TEXTS[3], TEXTS[6], chat]:
        ids = tiny_tokenizer(text)["input_ids"]
        expected = _reference_logits(model, ids)
        llm.reset()
        llm.eval(ids)
        actual = np.asarray(llm.scores[: len(ids)])
        assert np.abs(expected).max() > 5  # a trained, confident model: a wrong tensor would show
        difference = np.abs(actual - expected).max()
        assert difference <= tolerance, f"{text!r}: max |logit difference| {difference:.2e} > {tolerance:.0e}"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_greedy_continuation_matches_hfgpt(llama_cpp_model, trained, tiny_tokenizer, architecture, dtype):
    llm, model = llama_cpp_model(architecture, dtype), trained[architecture][1]
    for prompt in PROMPTS:
        ids = tiny_tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                      pad_token_id=tiny_tokenizer.pad_token_id)[0, len(ids):].tolist()
        actual = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):  # llama.cpp's greedy sampler
            actual.append(token)
            if len(actual) == len(expected):
                break
        assert actual == expected, prompt


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_llama_cpp_chat_renders_the_template_and_answers_like_hfgpt_chat(llama_cpp_model, trained, tiny_tokenizer,
                                                                         architecture):
    """llama-cpp-python's chat completion (the template from the GGUF metadata, rendered by its Jinja formatter)
    builds the same prompt and, greedy, gives the same answer as `hfgpt chat`."""
    llm, model = llama_cpp_model(architecture, "f32"), trained[architecture][1]
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! 🙂"},
                {"role": "user", "content": "Where is the\nred house?"}]
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"], eos_token=tiny_tokenizer.eos_token,
        bos_token=tiny_tokenizer.bos_token)
    prompt = formatter(messages=messages).prompt
    assert prompt == tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert llm.chat_format == "chat_template.default"  # llama-cpp-python picked the file's own template

    chat = Chat(model, tiny_tokenizer, system="You are terse.", temperature=0, max_new_tokens=24)
    chat.messages += messages[1:3]
    with open(os.devnull, "w") as devnull:
        expected = chat.say(messages[3]["content"], out=devnull)
    answer = llm.create_chat_completion(messages, temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=24)
    assert answer["choices"][0]["message"]["content"] == expected

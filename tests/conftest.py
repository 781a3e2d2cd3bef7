"""Shared fixtures: tiny configs, models and tokenizers made inside the tests. Nothing is downloaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# transformers swaps in activation kernels from the Hub when a model lands on a GPU; tests download nothing
os.environ.setdefault("USE_HUB_KERNELS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

torch.set_num_threads(1)  # the CI machine has 2 cores; one thread per test process is faster and fair


@pytest.fixture
def tiny_config():
    from hfgpt import HFGPTConfig

    return HFGPTConfig.from_preset("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    from hfgpt import HFGPTForCausalLM

    torch.manual_seed(0)
    return HFGPTForCausalLM(tiny_config).eval()


def _tiny_corpus_lines(seed: int = 0, n_lines: int = 240) -> list[str]:
    """A few KB of varied English-like lines made from word lists: capitals, numbers, punctuation, some non-ASCII."""
    import random

    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my neighbour", "the old sailor", "every student", "our teacher", "the river",
                "a small robot", "the baker", "her brother", "the city", "a quiet fox", "the café owner"]
    verbs = ["sees", "likes", "carries", "finds", "paints", "follows", "remembers", "builds", "counts", "watches",
             "answers", "opens", "sells", "reads"]
    objects = ["the red house", "a long letter", "three apples", "the morning train", "a broken clock", "the garden",
               "two blue boats", "the naïve question", "a warm loaf", "the mountain road", "some old coins",
               "the window", "a map of Tōkyō"]
    endings = [".", "!", "?", "...", ";", ","]
    extras = ["yesterday", "at night", "in 1999", "after lunch", "with care", "very slowly", "for 42 minutes",
              "near the sea", "again and again", "without a word"]
    lines = []
    for _ in range(n_lines):
        parts = [rng.choice(subjects), rng.choice(verbs), rng.choice(objects)]
        if rng.random() < 0.6:
            parts.append(rng.choice(extras))
        sentence = " ".join(parts)
        if rng.random() < 0.5:
            sentence = sentence[0].upper() + sentence[1:]
        if rng.random() < 0.2:
            sentence = f'"{sentence}," said {rng.choice(["Ann", "Bo", "Chidi", "Dana", "Émile"])}'
        lines.append(sentence + rng.choice(endings) + ("\n\n" if rng.random() < 0.1 else "\n"))
    return lines


@pytest.fixture(scope="session")
def tiny_corpus():
    """Training text for tokenizers and tiny language models: a list of lines, each ending with a newline."""
    return _tiny_corpus_lines()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus):
    """A byte-level BPE with hfgpt's special tokens and chat template; vocab_size matches the `tiny` preset (512)."""
    from hfgpt import HFGPTConfig
    from hfgpt.tokenization import train_tokenizer

    vocab_size = HFGPTConfig.from_preset("tiny").vocab_size
    return train_tokenizer(iter(tiny_corpus), vocab_size=vocab_size, show_progress=False)


class PoisonWeightsAt(TrainerCallback):
    """What a diverged step does to a model: NaN in its weights (here the LM head's, after step `step`)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.get_output_embeddings().weight[0, 0] = float("nan")


@pytest.fixture
def poison_weights_at():
    return PoisonWeightsAt

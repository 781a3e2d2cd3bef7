"""Shared fixtures: tiny configs, models and tokenizers made inside the tests. Nothing is downloaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

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

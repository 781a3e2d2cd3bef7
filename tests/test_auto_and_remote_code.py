"""The checkpoint directory: Auto classes with hfgpt installed, and remote code where it is not."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from hfgpt import (
    HFGPTConfig,
    HFGPTForCausalLM,
    HFGPTForQuestionAnswering,
    HFGPTForSequenceClassification,
    HFGPTForTokenClassification,
    HFGPTModel,
)

HEADS = {
    AutoModel: HFGPTModel,
    AutoModelForCausalLM: HFGPTForCausalLM,
    AutoModelForSequenceClassification: HFGPTForSequenceClassification,
    AutoModelForTokenClassification: HFGPTForTokenClassification,
    AutoModelForQuestionAnswering: HFGPTForQuestionAnswering,
}


@pytest.fixture(params=["learned", "sinusoidal", "rope"])
def saved_model(request, tmp_path):
    torch.manual_seed(0)
    config = HFGPTConfig.from_preset("tiny", position_embedding_type=request.param, num_labels=3, pad_token_id=0)
    model = HFGPTForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    # each head saved from its own class, so that its weights are in its checkpoint (not freshly initialised on load)
    for auto, cls in HEADS.items():
        cls(config).save_pretrained(tmp_path / auto.__name__)
    return model, tmp_path


def first_output(out) -> torch.Tensor:
    return next(value for value in out.values() if torch.is_tensor(value)).contiguous()


def test_save_writes_safetensors_config_and_code(saved_model):
    _, path = saved_model
    files = set(os.listdir(path))
    assert {"model.safetensors", "config.json", "configuration_hfgpt.py", "modeling_hfgpt.py"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    for directory in (path, *(path / auto.__name__ for auto in HEADS)):
        auto_map = json.loads((directory / "config.json").read_text())["auto_map"]
        assert set(auto_map) == {"AutoConfig", *(auto.__name__ for auto in HEADS)}


def test_auto_classes_load_each_head(saved_model):
    model, path = saved_model
    ids = torch.randint(0, 512, (2, 9))
    assert type(AutoConfig.from_pretrained(path)) is HFGPTConfig
    for auto, cls in HEADS.items():
        assert type(auto.from_pretrained(path)) is cls
        assert type(auto.from_config(model.config)) is cls
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    # fixed position tables are rebuilt after loading on the meta device, not left uninitialised
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()


CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["hfgpt"] = None  # hfgpt is not installed here: `import hfgpt` raises ImportError
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    path, inputs_path, out_path, *auto_names = sys.argv[1:]
    ids = load_file(inputs_path)["ids"]
    outputs = {}
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
    for name in auto_names:
        # each head alone, from its own directory, as a user of that head would load it
        model = getattr(transformers, name).from_pretrained(f"{path}/{name}", trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        outputs[name] = next(v for v in model(ids).values() if torch.is_tensor(v)).contiguous()
    lm = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    outputs["generated"] = lm.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    save_file(outputs, out_path)
    """
)


def test_remote_code_loads_every_head_without_hfgpt(saved_model, tmp_path_factory):
    model, path = saved_model
    work = tmp_path_factory.mktemp("child")
    ids = torch.randint(1, 512, (2, 9))
    save_file({"ids": ids}, work / "inputs.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(work / "modules")
    names = [auto.__name__ for auto in HEADS]
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(work / "inputs.safetensors"), str(work / "out.safetensors"),
         *names],
        cwd=work, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    outputs = load_file(work / "out.safetensors")
    for auto, cls in HEADS.items():
        expected = first_output(cls.from_pretrained(path / auto.__name__).eval()(ids))
        torch.testing.assert_close(outputs[auto.__name__], expected, atol=0, rtol=0)
    assert torch.equal(outputs["generated"], model.generate(ids[:1], max_new_tokens=5, do_sample=False,
                                                            pad_token_id=0))

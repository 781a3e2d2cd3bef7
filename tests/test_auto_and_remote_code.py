"""The checkpoint directory: Auto classes with hfgpt installed, and remote code where it is not."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from hfgpt import HFGPTConfig, HFGPTForCausalLM, HFGPTForSequenceClassification, HFGPTModel

HEADS = {
    "AutoModel": HFGPTModel,
    "AutoModelForCausalLM": HFGPTForCausalLM,
    "AutoModelForSequenceClassification": HFGPTForSequenceClassification,
}


@pytest.fixture(params=["learned", "sinusoidal", "rope"])
def saved_model(request, tmp_path):
    torch.manual_seed(0)
    config = HFGPTConfig.from_preset("tiny", position_embedding_type=request.param, num_labels=3, pad_token_id=0)
    model = HFGPTForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    # a classifier saved from its own class, so its head is in the checkpoint (not freshly initialised on load)
    HFGPTForSequenceClassification(config).save_pretrained(tmp_path / "classifier")
    return model, tmp_path


def test_save_writes_safetensors_config_and_code(saved_model):
    _, path = saved_model
    files = set(os.listdir(path))
    assert {"model.safetensors", "config.json", "configuration_hfgpt.py", "modeling_hfgpt.py"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    auto_map = json.loads((path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", *HEADS}


def test_auto_classes_load_each_head(saved_model):
    model, path = saved_model
    ids = torch.randint(0, 512, (2, 9))
    assert type(AutoConfig.from_pretrained(path)) is HFGPTConfig
    for auto_name, cls in HEADS.items():
        auto = {"AutoModel": AutoModel, "AutoModelForCausalLM": AutoModelForCausalLM,
                "AutoModelForSequenceClassification": AutoModelForSequenceClassification}[auto_name]
        loaded = auto.from_pretrained(path)
        assert type(loaded) is cls
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    # fixed position tables are rebuilt after loading on the meta device, not left uninitialised
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()


CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["hfgpt"] = None  # hfgpt is not installed here: `import hfgpt` raises ImportError
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    path, classifier_path, inputs_path, out_path = sys.argv[1:]
    ids = load_file(inputs_path)["ids"]
    outputs = {}
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification):
        source = classifier_path if auto is AutoModelForSequenceClassification else path
        model = auto.from_pretrained(source, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        out = model(ids)
        outputs[auto.__name__] = (out.last_hidden_state if auto is AutoModel else out.logits).contiguous()
    lm = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
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
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(path / "classifier"), str(work / "inputs.safetensors"), str(work / "out.safetensors")],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    from safetensors.torch import load_file

    outputs = load_file(work / "out.safetensors")
    expected = {
        "AutoModel": HFGPTModel.from_pretrained(path).eval()(ids).last_hidden_state,
        "AutoModelForCausalLM": model(ids).logits,
        "AutoModelForSequenceClassification": HFGPTForSequenceClassification.from_pretrained(
            path / "classifier").eval()(ids).logits,
    }
    for name, value in expected.items():
        torch.testing.assert_close(outputs[name], value, atol=0, rtol=0)
    assert torch.equal(outputs["generated"], model.generate(ids[:1], max_new_tokens=5, do_sample=False,
                                                            pad_token_id=0))

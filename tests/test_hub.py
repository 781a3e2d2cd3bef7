"""Publishing: the directory check, what would be uploaded, clear errors without a token or network, and proof
that the uploaded directory is complete: it loads, generates and shows its card in a process without hfgpt."""

import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi
from test_evaluation import CHAT_TEMPLATE, make_tokenizer

from hfgpt import HFGPTConfig, HFGPTForCausalLM, files
from hfgpt.cli import main as hfgpt_main
from hfgpt.hub import (
    HubError,
    ModelDirectoryError,
    check_model_dir,
    files_left_behind,
    files_to_upload,
    finish_model_dir,
    push_to_hub,
    upload_contents,
)


@pytest.fixture
def model_dir(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    model = HFGPTForCausalLM(HFGPTConfig.from_preset("modern-tiny", vocab_size=len(tokenizer))).eval()
    path = tmp_path / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    files.update_eval_results(path, "perplexity", {"perplexity": 301.5, "dataset": {"name": "valid.txt"}})
    return path, model, tokenizer


def test_check_model_dir_names_what_is_missing(model_dir, tmp_path):
    path, _, _ = model_dir
    assert check_model_dir(path)["model_type"] == "hfgpt"
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    for name in ("tokenizer.json", "tokenizer_config.json", "modeling_hfgpt.py", "model.safetensors"):
        (broken / name).unlink()
    (broken / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelDirectoryError) as error:
        check_model_dir(broken)
    message = str(error.value)
    assert "no safetensors weights" in message and "found pytorch_model.bin" in message
    assert "modelling code for trust_remote_code is missing: modeling_hfgpt.py" in message
    assert "no tokenizer" in message
    with pytest.raises(ModelDirectoryError, match="no config.json"):
        check_model_dir(tmp_path / "broken" / "..")


def test_upload_leaves_out_checkpoints_logs_pickles_and_user_data(model_dir):
    path, _, _ = model_dir
    (path / "checkpoint-10").mkdir()
    (path / "checkpoint-10" / "optimizer.pt").write_bytes(b"x")
    (path / "checkpoint-10" / "model.safetensors").write_bytes(b"x")
    (path / "training_args.bin").write_bytes(b"x")
    (path / "runs" / "Dec04_10-00-00_my-laptop").mkdir(parents=True)
    (path / "runs" / "Dec04_10-00-00_my-laptop" / "events.out.tfevents.1.my-laptop.42.0").write_bytes(b"x")
    (path / files.PREDICTIONS).write_text('{"text": "my private message"}\n')
    uploaded = set(files_to_upload(path))
    assert {"config.json", "model.safetensors", "configuration_hfgpt.py", "modeling_hfgpt.py", "tokenizer.json",
            "tokenizer_config.json", "eval_results.json"} <= uploaded
    assert not any(name.startswith(("checkpoint-", "runs/")) or name.endswith((".bin", ".pt")) for name in uploaded)
    assert files.PREDICTIONS not in uploaded and "my-laptop" not in " ".join(uploaded)
    left = dict(files_left_behind(path))
    assert set(left) == {"checkpoint-10/", "runs/", "training_args.bin", files.PREDICTIONS}
    assert "machine's name" in left["runs/"]


def test_uploaded_metrics_carry_no_local_paths(model_dir, tmp_path):
    path, _, _ = model_dir
    local = str(tmp_path / "home" / "me" / "data" / "heldout.tsv")
    files.update_eval_results(path, "classification", {"accuracy": 0.9, "dataset": {"name": "heldout.tsv",
                                                                                     "path": local}})
    files.write_json(path / files.TRAINING_SUMMARY, {"train_files": [local, "data/train.tsv"]})
    contents = upload_contents(path, "someone/model")
    uploaded = {name: (source if isinstance(source, bytes) else source.read_bytes()).decode("utf-8", "replace")
                for name, source in contents.items() if name.endswith(".json")}
    assert not any(str(tmp_path) in text for text in uploaded.values())
    summary = json.loads(uploaded[files.TRAINING_SUMMARY])
    assert summary["train_files"] == ["heldout.tsv", "data/train.tsv"]  # relative paths say nothing of the machine
    assert str(tmp_path) in (path / files.EVAL_RESULTS).read_text()  # the local file itself is left as it was


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def test_push_without_token_is_a_clear_error(model_dir, no_token):
    path, _, _ = model_dir
    with pytest.raises(HubError, match="No Hugging Face token found. Log in with `hf auth login`"):
        push_to_hub(path, "someone/model")
    assert hfgpt_main(["push", str(path), "someone/model"]) == 1  # the command prints the message, no traceback


def test_push_offline_or_without_network_is_a_clear_error(model_dir, monkeypatch):
    path, _, _ = model_dir
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="offline mode is on"):
        push_to_hub(path, "someone/model", token="hf_not_a_real_token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(HubError, match="Cannot reach the Hugging Face Hub at http://127.0.0.1:9"):
        push_to_hub(path, "someone/model", token="hf_not_a_real_token")


def test_push_calls_the_hub_api_with_the_directory(model_dir, monkeypatch):
    """The real HfApi methods, intercepted at the network boundary: the arguments must fit their signatures."""
    path, _, _ = model_dir
    calls = {}

    def create_repo(self, *args, **kwargs):
        inspect.signature(HfApi.create_repo).bind(self, *args, **kwargs)
        calls["create_repo"] = kwargs | {"repo_id": args[0] if args else kwargs["repo_id"]}
        return huggingface_hub.RepoUrl("https://huggingface.co/someone/model")

    def create_commit(self, **kwargs):
        inspect.signature(HfApi.create_commit).bind(self, **kwargs)
        calls["create_commit"] = kwargs
        return huggingface_hub.CommitInfo(commit_url="https://huggingface.co/someone/model/commit/abc",
                                          commit_message="m", commit_description="", oid="abc")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    assert (path / files.MODEL_CARD).exists() is False
    (path / "checkpoint-3").mkdir()
    (path / "checkpoint-3" / "model.safetensors").write_bytes(b"x")
    url = push_to_hub(path, "someone/model", private=True, token="hf_not_a_real_token")
    assert url == "https://huggingface.co/someone/model/commit/abc"
    assert calls["create_repo"]["repo_id"] == "someone/model" and calls["create_repo"]["private"] is True
    operations = {op.path_in_repo: op for op in calls["create_commit"]["operations"]}
    assert set(operations) == set(files_to_upload(path)) | {files.MODEL_CARD}
    card = operations[files.MODEL_CARD].path_or_fileobj.decode()  # built for the upload, naming the repository
    assert 'from_pretrained("someone/model", trust_remote_code=True)' in card
    assert not (path / files.MODEL_CARD).exists()  # and nothing written into the directory
    # a hand-written card is uploaded as it is
    (path / files.MODEL_CARD).write_text("---\nlicense: mit\n---\n# My own card\n")
    push_to_hub(path, "someone/model", token="hf_not_a_real_token")
    operations = {op.path_in_repo: op for op in calls["create_commit"]["operations"]}
    assert operations[files.MODEL_CARD].path_or_fileobj == str(path / files.MODEL_CARD)


def test_finish_model_dir_writes_the_card_and_pushes_only_when_asked(model_dir, monkeypatch):
    path, _, _ = model_dir
    pushed = []
    monkeypatch.setattr("hfgpt.hub._push_model_dir", lambda *args, **kwargs: pushed.append((args, kwargs)) or "url")
    card = finish_model_dir(path)
    assert card == path / files.MODEL_CARD and card.exists() and not pushed
    finish_model_dir(path, push_to_hub=True, hub_model_id="someone/run-1", hub_private_repo=True)
    assert pushed == [((path, "someone/run-1"), {"private": True, "token": None})]


CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["hfgpt"] = None  # hfgpt is not installed here: `import hfgpt` raises ImportError
    try:
        import hfgpt  # noqa: F401
        raise SystemExit("hfgpt is importable in the child; the test would prove nothing")
    except ImportError:
        pass
    import torch
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "To be or not"}], add_generation_prompt=True,
                                           tokenize=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)
    card = ModelCard.load(f"{path}/README.md")
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    json.dump({"module": type(model).__module__, "prompt_ids": ids[0].tolist(), "generated": generated[0].tolist(),
               "model_name": name, "metrics": [[r.metric_type, r.metric_value] for r in results],
               "pipeline_tag": card.data.pipeline_tag}, open(out, "w"))
    """
)


def test_uploaded_directory_loads_generates_and_has_a_card_without_hfgpt(model_dir, tmp_path_factory):
    path, model, tokenizer = model_dir
    finish_model_dir(path)
    # exactly the files push_to_hub would send, copied where nothing else of the repo is around
    upload = tmp_path_factory.mktemp("as_uploaded") / "model"
    for name, source in upload_contents(path, "model").items():
        (upload / name).parent.mkdir(parents=True, exist_ok=True)
        (upload / name).write_bytes(source if isinstance(source, bytes) else source.read_bytes())
    work = tmp_path_factory.mktemp("child")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(work / "modules")
    result = subprocess.run([sys.executable, "-c", CHILD, str(upload), str(work / "out.json")], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((work / "out.json").read_text())
    assert out["module"].startswith("transformers_modules")  # the remote code, not an installed hfgpt
    ids = torch.tensor([out["prompt_ids"]])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=tokenizer.eos_token_id)
    assert out["generated"] == expected[0].tolist() and len(out["generated"]) == ids.size(1) + 8
    assert out["model_name"] == "model" and out["metrics"] == [["perplexity", 301.5]]
    assert out["pipeline_tag"] == "text-generation"


def test_push_dry_run_lists_the_upload_and_writes_nothing(model_dir, capsys):
    path, _, _ = model_dir
    (path / "checkpoint-5").mkdir()
    (path / "checkpoint-5" / "optimizer.pt").write_bytes(b"x")
    (path / "runs").mkdir()
    (path / "runs" / "events.out.tfevents.1.my-laptop").write_bytes(b"x")
    finish_model_dir(path)  # the card of a finished run, naming the local directory
    before = {p: p.read_bytes() for p in path.glob("**/*") if p.is_file()}
    assert hfgpt_main(["push", str(path), "someone/model", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Dry run: nothing is uploaded")
    uploading, leaving = out.split("It would leave behind:")
    listed = [line.split()[0] for line in uploading.splitlines()[2:]]
    assert listed == sorted(set(files_to_upload(path)) | {files.MODEL_CARD})
    assert "checkpoint-5/" in leaving and "runs/" in leaving and "my-laptop" not in uploading
    assert {p: p.read_bytes() for p in path.glob("**/*") if p.is_file()} == before  # nothing written

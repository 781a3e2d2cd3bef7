"""Publishing a model directory to the Hugging Face Hub, and the end-of-training step that prepares one.

`push_to_hub(model_dir, repo_id)` checks that the directory is complete (config, safetensors weights, the modelling
code for `trust_remote_code=True`, tokenizer, card), then uploads what a model repository needs with
`HfApi.create_repo` + `create_commit`: weights, config, code, tokenizer, card, curves and metrics (with this machine's
paths reduced to file names). Everything else stays behind: checkpoints, TensorBoard logs, predictions on the user's
data. Nothing in the directory is written by a push. `finish_model_dir(...)` is what training scripts call last:
it writes the card and, with `push_to_hub=True`, publishes.

`hfgpt push DIR REPO_ID` is the command-line entry point.
"""

import argparse
import os
import sys
from pathlib import Path

from . import files
from .cards import is_generated_card, write_model_card
from .docs_smoke import scale_down

# What a model repository needs, and nothing else: an allowlist, so that whatever else lands in an output directory
# (TensorBoard event files, whose names carry the host name; predictions on the user's own data; checkpoints with
# pickled optimizer state) stays on the machine. Patterns match a file's name at any depth (adapter/ holds a model too).
MODEL_FILE_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                       "configuration_*.py", "modeling_*.py", "tokenization_*.py",
                       "adapter_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                       "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                       "chat_template.json"]
# ... and at the top level only: the card and the run's records (curves, summary, metrics)
TOP_LEVEL_FILES = [files.MODEL_CARD, files.TRAINING_SUMMARY, files.LOG_HISTORY_JSON, files.LOG_HISTORY_CSV,
                   files.LOSS_CURVE, files.EVAL_RESULTS]
# JSON files that may hold paths of this machine; they are uploaded with absolute paths reduced to file names
JSON_WITH_PATHS = {files.EVAL_RESULTS, files.TRAINING_SUMMARY, "adapter_config.json", "config.json"}
# Never uploaded, even where a pattern above matches: Trainer checkpoints, caches, temp files
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", ".*", ".*/**", "__pycache__/**", "*.tmp"]
# Why the usual leftovers stay behind (shown by --dry_run)
_LEFT_BEHIND_REASONS = [
    ("runs/", "TensorBoard logs: their file names carry this machine's name"),
    ("checkpoint-", "Trainer checkpoint (pickled optimizer state)"),
    (files.PREDICTIONS, "your validation texts"), (files.GENERATIONS, "your held-out prompts"),
    (files.PREFERENCE_PAIRS, "your held-out preference pairs"),
]


class ModelDirectoryError(ValueError):
    """The directory is not a complete, loadable model."""


class HubError(RuntimeError):
    """Publishing failed for a reason outside the directory: no token, no network, no permission."""


def check_model_dir(model_dir: str | os.PathLike) -> dict:
    """Raise `ModelDirectoryError` listing everything a published model would miss; return the parsed config.

    Checks: config.json; safetensors weights (every shard of a sharded checkpoint); for models whose config has an
    `auto_map` (hfgpt and other remote-code models) every code file it names; a tokenizer.
    """
    from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirectoryError(f"{model_dir} is not a directory.")
    config = files.read_json(model_dir / CONFIG_NAME)
    problems = []
    if config is None:
        problems.append(f"no {CONFIG_NAME} (save the model with `model.save_pretrained(dir)`)")
        config = {}
    index = files.read_json(model_dir / SAFE_WEIGHTS_INDEX_NAME)
    if index is not None:
        missing_shards = sorted(set(index["weight_map"].values()) - {p.name for p in model_dir.iterdir()})
        if missing_shards:
            problems.append(
                f"weight shards listed in {SAFE_WEIGHTS_INDEX_NAME} are missing: {', '.join(missing_shards)}"
            )
    elif not (model_dir / SAFE_WEIGHTS_NAME).is_file():
        pickled = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {', '.join(pickled)}: re-save with safetensors)" if pickled else ""
        problems.append(f"no safetensors weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}){hint}")
    code_files = sorted({reference.split("--")[-1].split(".")[0] + ".py"
                         for reference in (config.get("auto_map") or {}).values() if isinstance(reference, str)})
    missing_code = [name for name in code_files if not (model_dir / name).is_file()]
    if missing_code:
        problems.append(f"modelling code for trust_remote_code is missing: {', '.join(missing_code)} "
                        "(`import hfgpt` before `save_pretrained` so the code is copied)")
    if config.get("model_type") == "hfgpt" and not code_files:
        problems.append("config.json has no auto_map, so the model cannot load without hfgpt installed "
                        "(`import hfgpt` before `save_pretrained`)")
    if not any((model_dir / name).is_file() for name in files.TOKENIZER_FILES):
        problems.append(f"no tokenizer (none of {', '.join(files.TOKENIZER_FILES)}; `tokenizer.save_pretrained(dir)`)")
    if problems:
        raise ModelDirectoryError(f"{model_dir} is not a complete model directory:\n  - " + "\n  - ".join(problems))
    return config


def _is_uploaded(path: str) -> bool:
    from fnmatch import fnmatch

    name = path.rsplit("/", 1)[-1]
    if any(fnmatch(path, pattern) for pattern in IGNORE_PATTERNS):
        return False
    if path in TOP_LEVEL_FILES:
        return True
    if name == files.MODEL_CARD:  # a README.md below the top (PEFT's template card) names local paths
        return False
    return any(fnmatch(name, pattern) for pattern in MODEL_FILE_PATTERNS)


def _all_files(model_dir: Path) -> list[str]:
    return [p.relative_to(model_dir).as_posix() for p in sorted(model_dir.glob("**/*")) if p.is_file()]


def files_to_upload(model_dir: str | os.PathLike) -> list[str]:
    """The paths (relative, POSIX) a push uploads: the model files and the run's records, nothing else."""
    return [path for path in _all_files(Path(model_dir)) if _is_uploaded(path)]


def files_left_behind(model_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """(path, why) for what a push does not upload; a folder of checkpoints or logs counts once."""
    left, seen = [], set()
    for path in _all_files(Path(model_dir)):
        if _is_uploaded(path):
            continue
        top = path.split("/", 1)[0] + "/" if "/" in path else path
        if top.startswith("checkpoint-") or top == "runs/":
            if top in seen:
                continue
            seen.add(top)
            path = top
        why = next((reason for prefix, reason in _LEFT_BEHIND_REASONS if path.startswith(prefix)),
                   "not part of a model repository")
        left.append((path, why))
    return left


def _is_local_path(value: str) -> bool:
    return len(value) > 1 and (value.startswith(("/", "~")) or (len(value) > 2 and value[1:3] in (":\\", ":/")))


def without_local_paths(data):
    """`data` (parsed JSON) with every absolute path of this machine reduced to its file name."""
    if isinstance(data, dict):
        return {key: without_local_paths(value) for key, value in data.items()}
    if isinstance(data, list):
        return [without_local_paths(value) for value in data]
    if isinstance(data, str) and _is_local_path(data):
        return Path(data.replace("\\", "/")).name or data
    return data


def upload_contents(model_dir: str | os.PathLike, repo_id: str | None = None) -> dict[str, Path | bytes]:
    """{path in the repository: the local file, or the bytes to upload instead}. The card is built in memory for
    `repo_id` when the directory has none or one hfgpt wrote (a hand-written README.md goes as it is); JSON records
    go without this machine's paths. Nothing in the directory is written."""
    import json

    from .cards import build_model_card

    model_dir = Path(model_dir)
    contents: dict[str, Path | bytes] = {path: model_dir / path for path in files_to_upload(model_dir)}
    for path in contents:
        if path.rsplit("/", 1)[-1] in JSON_WITH_PATHS:
            data = files.read_json(model_dir / path)
            public = without_local_paths(data)
            if public != data:
                contents[path] = (json.dumps(public, indent=2) + "\n").encode("utf-8")
    card = model_dir / files.MODEL_CARD
    if not card.exists() or is_generated_card(card):
        contents[files.MODEL_CARD] = str(build_model_card(model_dir, model_id=repo_id)).encode("utf-8")
    return dict(sorted(contents.items()))


def prepare_for_upload(model_dir: str | os.PathLike, repo_id: str | None = None) -> list[str]:
    """Check the directory; return the files a push would upload (nothing is written)."""
    check_model_dir(model_dir)
    return list(upload_contents(model_dir, repo_id))


def _token_or_error(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubError(
            "No Hugging Face token found. Log in with `hf auth login` (or set the HF_TOKEN environment variable to a "
            "token with write access from https://huggingface.co/settings/tokens), or pass token=... / --token."
        )
    return token


def push_to_hub(model_dir: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
                commit_message: str = "Upload hfgpt model", revision: str | None = None,
                create_pr: bool = False) -> str:
    """Upload a complete model directory (weights, config, modelling code, tokenizer, card) to `repo_id`, creating
    the repository if needed. Returns the URL of the commit (or pull request)."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if not repo_id.strip("/") or repo_id.count("/") > 1:
        raise ValueError(f"repo_id={repo_id!r} must be 'name' or 'owner/name'.")
    check_model_dir(model_dir)
    token = _token_or_error(token)
    if constants.HF_HUB_OFFLINE:
        raise HubError("Cannot push: offline mode is on (HF_HUB_OFFLINE=1). Unset it to publish.")
    contents = upload_contents(model_dir, repo_id)
    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=source if isinstance(source, bytes)
                                         else str(source)) for path, source in contents.items()]
        commit = api.create_commit(repo_id=repo_url.repo_id, operations=operations, commit_message=commit_message,
                                   revision=revision, create_pr=create_pr)
    except OfflineModeIsEnabled as error:
        raise HubError(f"Cannot push: offline mode is on ({error}). Unset HF_HUB_OFFLINE to publish.") from error
    except HfHubHTTPError as error:
        raise HubError(f"The Hub refused the upload to {repo_id!r}: {error}. Check that the token has write access "
                       "to that namespace and that the repository name is valid.") from error
    except Exception as error:
        if not _is_network_error(error):
            raise
        raise HubError(f"Cannot reach the Hugging Face Hub at {constants.ENDPOINT}: {error!r}. Check the network "
                       "connection (and HF_ENDPOINT / proxy settings), then run `hfgpt push` again.") from error
    return getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or str(commit)


def _is_network_error(error: Exception) -> bool:
    """Connection refused, DNS failure, timeout: OSError, or the transport errors of whichever HTTP client
    huggingface_hub uses (httpx, its httpx2 fork, requests), recognised by class name to avoid importing them."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return isinstance(error, OSError) or bool(names & {"TransportError", "ConnectionError", "Timeout"})


_push_model_dir = push_to_hub  # finish_model_dir's `push_to_hub` argument (Trainer's name) shadows the function


def finish_model_dir(output_dir: str | os.PathLike, push_to_hub: bool = False, hub_model_id: str | None = None,
                     hub_token: str | None = None, hub_private_repo: bool | None = None) -> Path:
    """The last step of every training script: write the model card into `output_dir` and, when asked, publish
    the directory. `hub_model_id` defaults to the directory name (in the token owner's namespace), as in Trainer.

    Call it with `TrainingArguments.push_to_hub` etc., but keep Trainer's own push off (the card hfgpt writes
    describes the directory; Trainer's would replace it)."""
    output_dir = Path(output_dir)
    if push_to_hub:
        repo_id = hub_model_id or output_dir.resolve().name
        url = _push_model_dir(output_dir, repo_id, private=bool(hub_private_repo), token=hub_token)
        print(f"Pushed {output_dir} to {url}")
    else:
        write_model_card(output_dir)
    return output_dir / files.MODEL_CARD


def print_dry_run(model_dir: str | os.PathLike, repo_id: str) -> None:
    """What `hfgpt push` would upload, and what it leaves behind; writes nothing."""
    check_model_dir(model_dir)
    contents = upload_contents(model_dir, repo_id)
    print(f"Dry run: nothing is uploaded and nothing in {model_dir} is written.")
    print(f"`hfgpt push` would upload these {len(contents)} files to {repo_id}:")
    for path, source in contents.items():
        note = ""
        if isinstance(source, bytes):
            note = ("  (model card, written for this repository)" if path == files.MODEL_CARD
                    else "  (with this machine's paths reduced to file names)")
        print(f"  {path}{note}")
    left = files_left_behind(model_dir)
    if left:
        print("It would leave behind:")
        for path, why in left:
            print(f"  {path}  ({why})")


def argument_parser() -> argparse.ArgumentParser:
    """`hfgpt push`'s arguments (also what a recipe's push section takes)."""
    parser = argparse.ArgumentParser(prog="hfgpt push", description="Upload a model directory (weights, config, "
                                     "modelling code, tokenizer, model card) to the Hugging Face Hub.")
    parser.add_argument("model_dir")
    parser.add_argument("repo_id", help="'name' (in your namespace) or 'owner/name'.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--token", help="Hub token with write access (default: `hf auth login`'s, or HF_TOKEN).")
    parser.add_argument("--commit_message", default="Upload hfgpt model")
    parser.add_argument("--revision", help="Branch to push to (default: main).")
    parser.add_argument("--create_pr", action="store_true", help="Open a pull request instead of committing.")
    parser.add_argument("--dry_run", action="store_true", help="Check the directory and list what would be uploaded "
                        "(and what stays behind); writes and uploads nothing.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = scale_down("hfgpt push", argument_parser().parse_args(argv))
    try:
        if args.dry_run:
            print_dry_run(args.model_dir, args.repo_id)
            return 0
        url = push_to_hub(args.model_dir, args.repo_id, private=args.private, token=args.token,
                          commit_message=args.commit_message, revision=args.revision, create_pr=args.create_pr)
    except (ModelDirectoryError, HubError) as error:  # what the user must fix, not a bug: no traceback
        print(f"hfgpt push: {error}", file=sys.stderr)
        return 1
    print(f"Uploaded {args.model_dir} to {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

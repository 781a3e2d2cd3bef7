"""Publishing a model directory to the Hugging Face Hub, and the end-of-training step that prepares one.

`push_to_hub(model_dir, repo_id)` checks that the directory is complete (config, safetensors weights, the modelling
code for `trust_remote_code=True`, tokenizer, card), then uploads it with `HfApi.create_repo` + `upload_folder`.
Checkpoint folders and pickled files are never uploaded. `finish_model_dir(...)` is what training scripts call last:
it writes the card and, with `push_to_hub=True`, publishes.

`hfgpt push DIR REPO_ID` is the command-line entry point.
"""

import argparse
import os
import sys
from pathlib import Path

from . import files
from .cards import is_generated_card, write_model_card

# Not part of a published model: Trainer checkpoints (optimizer state is pickled), pickles of any kind, temp files.
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt",
                   "*.tmp", "__pycache__/**", "*.pyc"]


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


def files_to_upload(model_dir: str | os.PathLike) -> list[str]:
    """The paths (relative, POSIX) `upload_folder` sends with hfgpt's ignore patterns, in the same order."""
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    model_dir = Path(model_dir).resolve()
    paths = [p.relative_to(model_dir).as_posix() for p in sorted(model_dir.glob("**/*")) if p.is_file()]
    return list(filter_repo_objects(paths, ignore_patterns=IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS))


def prepare_for_upload(model_dir: str | os.PathLike, repo_id: str | None = None) -> list[str]:
    """Check the directory and make sure it has a card: a card hfgpt wrote is rewritten (so its usage examples name
    `repo_id`); a hand-written README.md is kept as it is. Returns the files that would be uploaded."""
    check_model_dir(model_dir)
    card = Path(model_dir) / files.MODEL_CARD
    if not card.exists() or is_generated_card(card):
        write_model_card(model_dir, model_id=repo_id)
    return files_to_upload(model_dir)


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
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if not repo_id.strip("/") or repo_id.count("/") > 1:
        raise ValueError(f"repo_id={repo_id!r} must be 'name' or 'owner/name'.")
    check_model_dir(model_dir)
    token = _token_or_error(token)
    if constants.HF_HUB_OFFLINE:
        raise HubError("Cannot push: offline mode is on (HF_HUB_OFFLINE=1). Unset it to publish.")
    prepare_for_upload(model_dir, repo_id)
    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_url.repo_id, folder_path=str(model_dir), commit_message=commit_message,
                                   ignore_patterns=list(IGNORE_PATTERNS), revision=revision, create_pr=create_pr)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hfgpt push", description="Upload a model directory (weights, config, "
                                     "modelling code, tokenizer, model card) to the Hugging Face Hub.")
    parser.add_argument("model_dir")
    parser.add_argument("repo_id", help="'name' (in your namespace) or 'owner/name'.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--token", help="Hub token with write access (default: `hf auth login`'s, or HF_TOKEN).")
    parser.add_argument("--commit_message", default="Upload hfgpt model")
    parser.add_argument("--revision", help="Branch to push to (default: main).")
    parser.add_argument("--create_pr", action="store_true", help="Open a pull request instead of committing.")
    parser.add_argument("--dry_run", action="store_true", help="Check the directory and list what would be uploaded.")
    args = parser.parse_args(argv)
    try:
        if args.dry_run:
            for path in prepare_for_upload(args.model_dir, args.repo_id):
                print(path)
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

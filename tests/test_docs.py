"""Every command of the documentation works: each ```bash, ```sh and ```python block of README.md and docs/ is a test.

The rules (docs/development.md, "The documentation is tested"):
- a block runs as written, after the earlier blocks of its page, in one working directory per page that has
  `../shared` beside it; `hfgpt` commands are scaled down by HFGPT_DOCS_SMOKE=1 (hfgpt/docs_smoke.py), never by
  editing the text. A Python block that imports a package that is not installed (an optional extra) is skipped.
- a block after a line `<!-- not-run: reason -->` is not run; its shell syntax is checked with `bash -n`, its Python
  compiled, and every `hfgpt ...` / `python train|eval/...` command in it must parse under HFGPT_DOCS_SMOKE=parse.
Plus: the site builds with `mkdocs build --strict`, and every relative link of the pages points at a file.
"""

import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from hfgpt.docs_smoke import ENV, ArgumentsParsed

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # the data the guides use, beside the repository (../shared/data/...)
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LANGUAGES = {"bash": "bash", "sh": "bash", "python": "python"}
# repository folders a documented command may name (python train/pretrain.py ...); linked into each page's directory
REPO_FOLDERS = [name for name in ("train", "eval", "bench", "recipes", "model_cards") if (REPO / name).is_dir()]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<language>[\w+-]*)[^\n]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(?P<reason>.+?)\s*-->\s*$")
BLOCK_TIMEOUT = 300  # seconds; a scaled-down block takes seconds


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str  # "bash" or "python"
    code: str
    not_run: str | None  # the reason given in <!-- not-run: ... -->, or None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def page_blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        language = LANGUAGES.get(match["language"].lower())
        if language is None:  # output listings, YAML, ...: not commands
            continue
        line = text.count("\n", 0, match.start()) + 1
        previous = [row for row in text[: match.start()].splitlines() if row.strip()][-1:] or [""]
        not_run = NOT_RUN.match(previous[0])
        indent = match["indent"]
        code = "".join(row[len(indent):] if row.startswith(indent) else row
                       for row in match["code"].splitlines(keepends=True))
        blocks.append(Block(page, line, language, code, not_run["reason"] if not_run else None))
    return blocks


BLOCKS = [block for page in PAGES for block in page_blocks(page)]


def test_the_pages_have_blocks_to_run():
    """A fence this file cannot read would silently test nothing."""
    assert {"README.md", "docs/pretraining.md"} <= {str(block.page.relative_to(REPO)) for block in BLOCKS}
    assert sum(block.not_run is None for block in BLOCKS) >= 20


# --- running a page's blocks in order -------------------------------------------------------------------------------


def smoke_environment() -> dict:
    env = dict(os.environ)
    env.update({ENV: "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "USE_HUB_KERNELS": "0", "MPLBACKEND": "Agg",
                "OMP_NUM_THREADS": "1"})  # pytest-xdist runs two pages at once on two cores
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this environment's `hfgpt`
    return env


class Page:
    """A page's working directory, shared by the pytest-xdist workers: its blocks run in page order, each once.

    Whichever worker gets a block runs the page's earlier blocks that have not run yet, holding the page's lock, and
    records in the directory what ran (and what failed), so a worker that gets a later block of the same page waits
    for the lock and then finds them done.
    """

    def __init__(self, page: Path, root: Path):
        self.blocks = [block for block in BLOCKS if block.page == page and block.not_run is None]
        slug = re.sub(r"\W+", "-", str(page.relative_to(REPO)))
        self.root = root / slug
        self.directory = self.root / "work"  # ../shared beside it, as beside the repository
        self.lock = FileLock(str(root / f"{slug}.lock"))
        self.state = self.root / "state.json"

    def run_through(self, block: Block) -> None:
        with self.lock:
            if not self.directory.is_dir():
                self.directory.mkdir(parents=True)
                (self.root / "shared").symlink_to(SHARED, target_is_directory=True)
                for folder in REPO_FOLDERS:
                    (self.directory / folder).symlink_to(REPO / folder, target_is_directory=True)
            state = json.loads(self.state.read_text()) if self.state.is_file() else {"done": [], "failed": None}
            try:
                for earlier in self.blocks[: self.blocks.index(block) + 1]:
                    if earlier.line not in state["done"]:
                        if state["failed"]:
                            pytest.skip(f"an earlier block of the page, {state['failed']}, failed")
                        state["done"].append(earlier.line)
                        error = self._run(earlier)
                        if error:
                            state["failed"] = earlier.name
                            because = "" if earlier is block else f"an earlier block of the page, {earlier.name}, fails: "
                            pytest.fail(because + error, pytrace=False)
            finally:
                self.state.write_text(json.dumps(state))

    def _run(self, block: Block) -> str | None:
        """Run one block; what went wrong, or None."""
        script = self.root / f"block_{block.line}.{'sh' if block.language == 'bash' else 'py'}"
        script.write_text(block.code, encoding="utf-8")
        command = ["bash", "-e", "-o", "pipefail", str(script)] if block.language == "bash" else [sys.executable,
                                                                                                   str(script)]
        try:
            done = subprocess.run(command, cwd=self.directory, env=smoke_environment(), capture_output=True,
                                  text=True, timeout=BLOCK_TIMEOUT, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as timeout:
            return f"{block.name} ran past {BLOCK_TIMEOUT} s:\n{block.code}\n{str(timeout.stderr or '')[-3000:]}"
        if done.returncode != 0:
            output = (done.stdout[-3000:] + "\n--- stderr ---\n" + done.stderr[-6000:]).strip()
            return f"{block.name} exited with {done.returncode}:\n{block.code}\n{output}"
        # a new user following the docs meets no traceback and no Python warning (issue #27): each one is either
        # fixed or, when a dependency prints it and the user cannot act on it, kept out by hfgpt/quiet.py
        noise = [line for line in (done.stdout + done.stderr).splitlines()
                 if line.startswith("Traceback (most recent call last)") or PYTHON_WARNING.search(line)]
        if noise:
            return f"{block.name} printed what a user cannot act on:\n" + "\n".join(noise[:10])
        return None


# how Python's warnings module prints a warning: 'path.py:12: FutureWarning: ...'
PYTHON_WARNING = re.compile(r"\.py:\d+: \w*Warning: ")


@pytest.fixture(scope="session")
def pages(tmp_path_factory):
    # one directory for the whole run, which every xdist worker sees (each worker's own basetemp is inside it)
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "docs-pages"
    root.mkdir(exist_ok=True)
    return lambda path: Page(path, root)


def missing_imports(code: str) -> list[str]:
    modules = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module.split(".")[0])
    return sorted(module for module in modules if importlib.util.find_spec(module) is None)


RUN = [pytest.param(block, id=block.name) for block in BLOCKS if block.not_run is None]


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the guides' data, {SHARED}, is not beside the repository")
@pytest.mark.parametrize("block", RUN)
def test_block_runs(block, pages):
    if block.language == "python" and (missing := missing_imports(block.code)):
        pytest.skip(f"needs {', '.join(missing)}, not installed here (an optional extra)")
    pages(block.page).run_through(block)


# --- blocks that are not run: their commands must still parse -------------------------------------------------------

SCRIPTS = re.compile(r"(?:^|/)(train|eval)/(\w+)\.py$")
SHELL_OPERATORS = {";", "&&", "||", "|", "&", "(", ")"}


def documented_commands(code: str) -> list[list[str]]:
    """hfgpt argument lists of the `hfgpt ...` and `... train/X.py` / `eval/X.py ...` commands of a shell block."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():  # a newline ends a command, as in the shell
        words = []
        for token in [*shlex.shlex(line, posix=True, punctuation_chars=True), ";"]:
            if token not in SHELL_OPERATORS:
                words.append(token)
                continue
            while words and re.match(r"^\w+=", words[0]):  # VARIABLE=value before the command
                words.pop(0)
            if words and words[0] == "hfgpt":
                commands.append(words[1:])
            elif (script := next((i for i, word in enumerate(words) if SCRIPTS.search(word)), None)) is not None:
                folder, name = SCRIPTS.search(words[script]).groups()
                commands.append(([name] if folder == "train" else ["eval", name]) + words[script + 1:])
            words = []
    return commands


NOT_RUN_BLOCKS = [pytest.param(block, id=block.name) for block in BLOCKS if block.not_run is not None]


@pytest.mark.parametrize("block", NOT_RUN_BLOCKS)
def test_block_that_is_not_run_parses(block, monkeypatch, capsys):
    if block.language == "python":
        compile(block.code, block.name, "exec")
        return
    syntax = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
    assert syntax.returncode == 0, f"{block.name}: {syntax.stderr}"
    from hfgpt.cli import main

    monkeypatch.setenv(ENV, "parse")
    for argv in documented_commands(block.code):
        try:
            code = main(argv)
        except ArgumentsParsed:
            continue
        except SystemExit as exit:  # argparse: an error (2), or --help (0)
            code = exit.code
        if code in (0, None) and {"-h", "--help", "-V", "--version"} & set(argv):
            continue
        pytest.fail(f"{block.name}: `hfgpt {shlex.join(argv)}` does not parse (exit {code}):\n"
                    f"{capsys.readouterr().err[-3000:]}", pytrace=False)


def test_commands_are_found_in_shell_blocks():
    code = ("FOO=1 hfgpt pretrain --preset small \\\n    --max_steps 2 && hfgpt eval rouge --x y  # a comment\n"
            "accelerate launch --config_file train/accelerate/ddp.yaml train/pretrain.py --bf16\n"
            "python eval/perplexity.py --file a.txt | tail -1\nhf auth login\n")
    assert documented_commands(code) == [["pretrain", "--preset", "small", "--max_steps", "2"],
                                         ["eval", "rouge", "--x", "y"], ["pretrain", "--bf16"],
                                         ["eval", "perplexity", "--file", "a.txt"]]


# --- the site and the links -----------------------------------------------------------------------------------------

LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(REPO)) for page in PAGES])
def test_relative_links_point_at_files(page):
    """MkDocs checks the links between guides; this also covers the README and the links out of docs/ (bench/)."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    broken = []
    for match in LINK.finditer(text):
        target = match["target"].split("#", 1)[0]
        if not target or re.match(r"^[a-z]+:", target):  # an anchor on the page, or a URL
            continue
        if not (page.parent / target).exists():
            broken.append(match["target"])
    assert not broken, f"{page.relative_to(REPO)} links to files that do not exist: {broken}"


def test_site_builds_strict(tmp_path):
    """Broken links or anchors, pages missing from the nav, API references that do not resolve: all fail."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-5000:]
    assert (tmp_path / "site" / "reference" / "index.html").read_text().count("HFGPTConfig") > 1


def test_the_preset_list_names_every_preset():
    from hfgpt import HFGPTConfig

    model_page = (REPO / "docs" / "model.md").read_text(encoding="utf-8")
    paragraph = model_page.split("Presets: `HFGPTConfig.from_preset(name, **overrides)`", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"`([a-z0-9-]+)`", paragraph)
    assert set(HFGPTConfig.presets()) <= set(listed), set(HFGPTConfig.presets()) - set(listed)

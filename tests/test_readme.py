"""The README's claims a new user meets first: its first Python example runs as written and writes only under out/
(which .gitignore keeps out of the repository), and its preset list names every preset."""

import re
import subprocess
from pathlib import Path

from hfgpt import HFGPTConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_ten_lines_of_python_run_as_written_and_write_under_out(tmp_path, monkeypatch):
    section = README.split("## Ten lines of Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)
    assert len(code.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README: Ten lines of Python", "exec"), {})
    written = {path.relative_to(tmp_path).parts[0] for path in tmp_path.rglob("*") if path.is_file()}
    assert written == {"out"}
    ignored = subprocess.run(["git", "check-ignore", "-q", "out/my-gpt/config.json"], cwd=REPO)
    assert ignored.returncode == 0, "out/ is not in .gitignore"


def test_the_preset_list_names_every_preset():
    paragraph = README.split("Presets: `HFGPTConfig.from_preset(name, **overrides)`", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"`([a-z0-9-]+)`", paragraph)
    assert set(HFGPTConfig.presets()) <= set(listed), set(HFGPTConfig.presets()) - set(listed)

"""The README's claims a new user meets first: its first Python example fits in ten lines, runs as written and writes
only under out/ (which .gitignore keeps out of the repository). (tests/test_docs.py runs every block of the README and
the guides; this checks what that cannot: the length, and where the files go.)"""

import re
import subprocess
from pathlib import Path

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


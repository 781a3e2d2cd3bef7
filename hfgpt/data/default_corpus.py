"""The corpus the quickstart trains on when given no data: the docstrings of Python's standard library.

Every machine that runs hfgpt has them, so the quickstart needs no download, and nothing is copied into the repository.
The source files are parsed with `ast` (nothing is imported or executed); each module, class and function docstring
becomes one document. About 6,000 documents and 1.5 million characters of English prose mixed with code examples on
CPython 3.11 (the exact text depends on the Python version).
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from pathlib import Path

from datasets import Dataset

# Test suites and vendored tools: code-heavy, not prose.
_SKIPPED_TOP_LEVEL = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip"}
_DOCUMENTED_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

DESCRIPTION = f"docstrings of the Python {sys.version.split()[0]} standard library"


def stdlib_directory() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_docstrings(min_chars: int = 40, max_chars: int | None = None) -> list[str]:
    """Unique docstrings of at least `min_chars` characters, in a fixed order (sorted file paths, then source order),
    stopping after `max_chars` characters in total."""
    root = stdlib_directory()
    seen, documents, total = set(), [], 0
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in _SKIPPED_TOP_LEVEL or "tests" in parts or "test" in parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue  # a few stdlib files are deliberately broken or not UTF-8
        for node in ast.walk(tree):
            if not isinstance(node, _DOCUMENTED_NODES):
                continue
            text = ast.get_docstring(node, clean=True)
            if not text or len(text) < min_chars or text in seen:
                continue
            seen.add(text)
            documents.append(text)
            total += len(text)
            if max_chars is not None and total >= max_chars:
                return documents
    return documents


def default_corpus(max_chars: int | None = None) -> Dataset:
    """The quickstart corpus as a `Dataset` with one "text" column."""
    documents = stdlib_docstrings(max_chars=max_chars)
    if not documents:
        raise RuntimeError(
            f"Found no docstrings under {stdlib_directory()} (a Python installation without its .py sources?). "
            "Pass your own text with --train_file or --dataset_name."
        )
    return Dataset.from_dict({"text": documents})


__all__ = ["DESCRIPTION", "default_corpus", "stdlib_docstrings", "stdlib_directory"]

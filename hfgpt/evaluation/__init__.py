"""Evaluation: metric modules for the `evaluate` library, shipped inside hfgpt, and runners that apply them to a model.

The metric modules under `metrics/` load offline with `evaluate.load(metric_path(name))`; each is a thin
`evaluate.Metric` around a plain function in this package (`perplexity.compute_perplexity`,
`rouge.compute_rouge`, `classification.compute_accuracy` / `compute_classification`), so the same computation is
available with or without `evaluate`. `hfgpt.evaluation.cli` holds the `hfgpt eval ...` runners.

This module imports nothing heavy: `metric_path` is cheap to call.
"""

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
METRIC_NAMES = ("perplexity", "rouge", "accuracy", "classification")


def metric_path(name: str) -> str:
    """The local path of an hfgpt metric module, for `evaluate.load(metric_path("rouge"))` (works offline)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; hfgpt ships: {', '.join(METRIC_NAMES)}.")
    script = METRICS_DIR / name / f"{name}.py"
    if not script.is_file():  # an install that dropped the package data
        raise FileNotFoundError(
            f"The metric script {script} is missing from this hfgpt install; reinstall hfgpt "
            "(`pip install --force-reinstall hfgpt`) so its package data is included."
        )
    return str(script.parent)


__all__ = ["METRIC_NAMES", "metric_path"]

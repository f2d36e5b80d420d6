"""Where a run finds its data and writes its cache and results: one rule for every entry point.

A run-config value wins; else an environment variable; else the default below. The
launcher, ``flwr run``, the in-process harness and the deployment all resolve the same
way (relative paths against the current folder of the process that resolves them: the
launcher resolves them before the run starts, so Flower's processes get absolute paths).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "FEDHLM_DATA_DIR"
CACHE_DIR_ENV = "FEDHLM_CACHE_DIR"
RESULTS_DIR_ENV = "FEDHLM_RESULTS_DIR"

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DATA = PROJECT_ROOT / "data" / "ag_news"  # in a checkout; not in the app bundle a SuperNode receives
DEFAULT_CACHE = "~/.cache/fedhlm"
DEFAULT_RESULTS = "results"


def _resolved(value: str) -> Path:
    return Path(value).expanduser().resolve()


def data_dir(configured: str) -> Path | None:
    """The local dataset folder: ``data-dir``, else ``$FEDHLM_DATA_DIR``, else the bundled AG News
    (None when none of them is set and the bundle is absent)."""
    value = configured or os.environ.get(DATA_DIR_ENV, "")
    if value:
        return _resolved(value)
    return BUNDLED_DATA if BUNDLED_DATA.is_dir() else None


def cache_dir(configured: str) -> Path:
    """The feature, model and oracle-answer cache: ``cache-dir``, else ``$FEDHLM_CACHE_DIR``, else ~/.cache/fedhlm."""
    return _resolved(configured or os.environ.get(CACHE_DIR_ENV, "") or DEFAULT_CACHE)


def results_dir(configured: str) -> Path:
    """The results root: ``results-dir``, else ``$FEDHLM_RESULTS_DIR``, else ./results."""
    return _resolved(configured or os.environ.get(RESULTS_DIR_ENV, "") or DEFAULT_RESULTS)

"""Text-classification datasets: AG News from the Hub or any CSV folder.

Two CSV layouts are understood, optionally gzip-compressed (``.csv.gz``):

- the official AG News layout: no header, ``"class","title","description"``;
  the text is ``title + " " + description``;
- a headed layout with a ``label`` and a ``text`` column (other columns ignored).

Labels may be integers (0- or 1-based) or strings. They are mapped to
contiguous class ids ``0..C-1`` in sorted order; class names come from a
``classes.txt`` file beside the CSVs (one name per line, in label order) when
present, else from the labels themselves. So any classification dataset in
these formats works by config alone. When the labels are the class names of
``classes.txt``, that file fixes the class ids and the class count, so a
SuperNode's folder that lacks some classes (non-IID) still agrees with the
federation (``fedhlm_app.tools.deploy.node_data`` writes folders this way).
"""

from __future__ import annotations

import csv
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedhlm_app import paths


class DataError(ValueError):
    """A dataset could not be found or read; the message says what to fix."""


@dataclass(frozen=True)
class Split:
    """One split of a dataset: texts and integer class ids."""

    texts: list[str]
    labels: np.ndarray  # int64, values in 0..num_classes-1

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: np.ndarray) -> Split:
        """The rows at ``indices``, in that order."""
        return Split([self.texts[i] for i in indices], self.labels[indices])


@dataclass(frozen=True)
class Dataset:
    """A train and a test split sharing one class list."""

    train: Split
    test: Split
    class_names: list[str]
    source: str  # where it came from, for the report

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def truncated(self, max_train: int, max_test: int, seed: int) -> Dataset:
        """Seeded subsets of at most ``max_train``/``max_test`` rows (0 keeps a split whole)."""
        return Dataset(truncate(self.train, max_train, seed), truncate(self.test, max_test, seed), self.class_names, self.source)


def resolve_data_dir(configured: str) -> Path:
    """The local data folder (``fedhlm_app.paths.data_dir``), checked to exist."""
    path = paths.data_dir(configured)
    if path is None:
        raise DataError(f"no local data folder: set run-config key 'data-dir' or ${paths.DATA_DIR_ENV}")
    if not path.is_dir():
        raise DataError(f"data-dir '{path}' is not a directory")
    return path


def _find_file(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"data file '{name}' (or '{name}.gz') not found in '{folder}'")


def _read_rows(path: Path) -> list[list[str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as fh:
            return [row for row in csv.reader(fh) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read '{path}': {exc}") from exc


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    """Read one CSV file into raw (label, text) columns, detecting its layout."""
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"'{path}' has no rows")
    header = [h.strip().lower() for h in rows[0]]
    if "label" in header and "text" in header:
        li, ti = header.index("label"), header.index("text")
        body = rows[1:]
        bad = [n for n, r in enumerate(body, start=2) if len(r) <= max(li, ti)]
        if bad:
            raise DataError(f"'{path}': rows {bad[:5]} have too few columns")
        labels = [r[li].strip() for r in body]
        texts = [r[ti].strip() for r in body]
    else:
        bad = [n for n, r in enumerate(rows, start=1) if len(r) < 2]
        if bad:
            raise DataError(
                f"'{path}': rows {bad[:5]} have too few columns "
                "(expected 'class,title,description' or a 'label,text' header)"
            )
        labels = [r[0].strip() for r in rows]
        texts = [" ".join(part.strip() for part in r[1:]).strip() for r in rows]
    empty = [n for n, t in enumerate(texts) if not t]
    if empty:
        raise DataError(f"'{path}': {len(empty)} rows have an empty text (first at row {empty[0]})")
    return labels, texts


def _label_order(raw: set[str]) -> list[str]:
    """Sort raw labels numerically when they are all integers, else as strings."""
    if all(x.lstrip("-").isdigit() for x in raw):
        return sorted(raw, key=int)
    return sorted(raw)


def _listed_classes(folder: Path) -> list[str]:
    """The class names of ``folder/classes.txt`` (empty when there is none)."""
    names_file = folder / "classes.txt"
    if not names_file.is_file():
        return []
    return [ln.strip() for ln in names_file.read_text(encoding="utf-8").splitlines() if ln.strip()]


def load_local(folder: Path, train_file: str, test_file: str) -> Dataset:
    """Load a train and a test CSV from ``folder``."""
    train_raw, train_texts = read_csv(_find_file(folder, train_file))
    test_raw, test_texts = read_csv(_find_file(folder, test_file))
    listed = _listed_classes(folder)
    raw = set(train_raw) | set(test_raw)
    if listed and raw <= set(listed):
        order, names = listed, listed  # labels by name: the listed classes, all of them, in that order
    elif listed and raw & set(listed):
        unknown = sorted(raw - set(listed))
        raise DataError(f"'{folder}': labels {unknown[:5]} are not classes of classes.txt ({listed})")
    else:
        order = _label_order(set(train_raw))
        names = listed if len(listed) == len(order) else list(order)
    unseen = set(test_raw) - set(order)
    if unseen:
        raise DataError(
            f"test labels {sorted(unseen)[:5]} do not occur in the train split "
            f"(train labels: {order})"
        )
    index = {label: i for i, label in enumerate(order)}
    to_ids = lambda raw: np.array([index[x] for x in raw], dtype=np.int64)  # noqa: E731
    return Dataset(
        train=Split(train_texts, to_ids(train_raw)),
        test=Split(test_texts, to_ids(test_raw)),
        class_names=names,
        source=f"local:{folder}",
    )


def _hub_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in {"1", "true", "yes", "on"} for f in flags)


def load_hub(name: str) -> Dataset:
    """Load a dataset with ``text``/``label`` columns from the Hugging Face Hub."""
    import datasets  # deferred: slow import, only needed here

    ds = datasets.load_dataset(name)
    feature = ds["train"].features["label"]
    names = list(getattr(feature, "names", [])) or [
        str(x) for x in sorted(set(ds["train"]["label"]))
    ]
    split = lambda s: Split(list(ds[s]["text"]), np.asarray(ds[s]["label"], dtype=np.int64))  # noqa: E731
    return Dataset(split("train"), split("test"), names, source=f"hub:{name}")


def load_dataset(source: str, hub_name: str, data_dir: str, train_file: str, test_file: str) -> Dataset:
    """Load the configured dataset.

    ``source`` is ``hub``, ``local`` or ``auto``: ``auto`` tries the Hub unless
    ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set, and falls back to the
    local folder when the Hub is not reachable.
    """
    if source == "hub" or (source == "auto" and not _hub_offline()):
        try:
            return load_hub(hub_name)
        except Exception as exc:  # noqa: BLE001 - any Hub failure means "use local"
            if source == "hub":
                raise DataError(f"cannot load '{hub_name}' from the Hub: {exc}") from exc
    return load_local(resolve_data_dir(data_dir), train_file, test_file)


def truncate(split: Split, max_items: int, seed: int) -> Split:
    """A seeded random subset of at most ``max_items`` rows (0 keeps all)."""
    if max_items <= 0 or max_items >= len(split):
        return split
    rng = np.random.default_rng(seed)
    return split.subset(np.sort(rng.choice(len(split), size=max_items, replace=False)))


__all__ = ["DataError", "Dataset", "Split", "load_dataset", "load_local", "read_csv", "truncate"]

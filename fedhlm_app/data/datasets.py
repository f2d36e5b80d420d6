"""Text-classification datasets: AG News from the Hub or any CSV folder.

Two CSV layouts are understood, optionally gzip-compressed (``.csv.gz``):

- the official AG News layout: no header, ``"class","title","description"``;
  the text is ``title + " " + description``;
- a header row naming a label column (``LABEL_COLUMNS``) and a text column (``TEXT_COLUMNS``),
  or ``title``/``description`` columns joined as in AG News; other columns are ignored. A first
  row that names any of these columns is a header, and one that names no usable pair is refused
  with the names it would accept, so a header never becomes a data row; nor does a first row whose
  label looks like a column name (a word that occurs nowhere else while every other label is a
  number).

Labels may be integers (0- or 1-based) or strings. They are normalised (surrounding whitespace
removed, inner whitespace collapsed) and labels that differ only in case are one class (named by
its most frequent spelling; a warning lists the merged spellings and their counts). Labels that
look alike but differ otherwise ("Sport" and "Sports") stay apart, with a warning. They are mapped to
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
import difflib
import gzip
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from logging import getLogger
from pathlib import Path

import numpy as np

from fedhlm_app import paths

log = getLogger("fedhlm")

LABEL_COLUMNS = ("label", "labels", "class", "category", "target")
TEXT_COLUMNS = ("text", "sentence", "content", "document", "review")
JOINED_TEXT_COLUMNS = ("title", "description")  # AG News's columns, joined like its headerless layout
MAX_FIELD_CHARS = 1 << 24  # the csv module's default (131,072 characters) is less than some documents


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

    def validation(self, fraction: float, seed: int) -> Dataset:
        """The train split without a seeded share ``fraction`` of its rows, which become the test split:
        defaults are tuned on these, and the real test rows stay untouched until the report."""
        rows = np.random.default_rng([seed, 3]).permutation(len(self.train))
        held = np.sort(rows[: int(round(fraction * len(rows)))])
        kept = np.sort(rows[len(held):])
        return Dataset(self.train.subset(kept), self.train.subset(held), self.class_names, f"{self.source} (validation rows of train)")


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
    """The non-empty rows of a CSV file; a file that cannot be read is named with the row reached."""
    opener = gzip.open if path.suffix == ".gz" else open
    csv.field_size_limit(MAX_FIELD_CHARS)
    rows: list[list[str]] = []
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:  # -sig: a byte-order mark (Excel) is not a header letter
            rows.extend(row for row in csv.reader(fh) if row)
    except csv.Error as exc:
        raise DataError(f"cannot read '{path}' after row {len(rows)}: {exc} (a field may hold at most {MAX_FIELD_CHARS:,} "
                        "characters; is a quote left open?)") from exc
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:  # gzip: BadGzipFile is an OSError, truncation EOFError
        raise DataError(f"cannot read '{path}' after row {len(rows)}: {type(exc).__name__}: {exc or 'truncated file'}") from exc
    return rows


def _columns(header: list[str]) -> tuple[int, list[int]] | None:
    """The label column and the text columns a header names, or None when it is no header; refuses a
    header that names some columns but no usable label and text pair."""
    names = [h.strip().lower() for h in header]
    known = [n for n in names if n in LABEL_COLUMNS + TEXT_COLUMNS + JOINED_TEXT_COLUMNS]
    if not known or names[0].lstrip("-").isdigit():  # a data row starts with its label; a numeric one is no column name
        return None
    label = next((names.index(n) for n in LABEL_COLUMNS if n in names), None)
    text = next(([names.index(n)] for n in TEXT_COLUMNS if n in names), None)
    text = text or [names.index(n) for n in JOINED_TEXT_COLUMNS if n in names]
    if label is None or not text:
        raise DataError(f"header {header}: needs a label column (one of {list(LABEL_COLUMNS)}) and a text column (one of "
                        f"{list(TEXT_COLUMNS)}, or {' and/or '.join(JOINED_TEXT_COLUMNS)}); it names {known}")
    return label, text


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    """Read one CSV file into raw (label, text) columns, detecting its layout."""
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"'{path}' has no rows")
    try:
        columns = _columns(rows[0])
    except DataError as exc:
        raise DataError(f"'{path}': {exc}") from None
    if columns is None:
        label_col, text_cols, body, first = 0, None, rows, 1
    else:
        (label_col, text_cols), body, first = columns, rows[1:], 2
    if not body:
        raise DataError(f"'{path}' has a header but no rows")
    width = label_col + 1 if text_cols is None else max(label_col, *text_cols) + 1
    bad = [n for n, r in enumerate(body, start=first) if len(r) < max(width, 2)]
    if bad:
        raise DataError(f"'{path}': rows {bad[:5]} have too few columns "
                        f"(expected 'class,title,description' or a header naming a label and a text column)")
    labels = [r[label_col] for r in body]
    if text_cols is None:
        texts = [" ".join(part.strip() for part in r[1:]).strip() for r in body]
        _refuse_header_row(path, labels)
    else:
        texts = [" ".join(r[i].strip() for i in text_cols).strip() for r in body]
    empty = [n for n, t in enumerate(texts, start=first) if not t]
    if empty:
        raise DataError(f"'{path}': {len(empty)} rows have an empty text (first at row {empty[0]})")
    return labels, texts


def _refuse_header_row(path: Path, labels: list[str]) -> None:
    """A headerless file whose first label is a word found nowhere else, while every other label is a
    number, starts with a header this reader does not know."""
    first, rest = labels[0].strip(), [x.strip() for x in labels[1:]]
    if rest and not first.lstrip("-").isdigit() and first not in rest and all(x.lstrip("-").isdigit() for x in rest):
        raise DataError(f"'{path}': the first row looks like a header ({labels[0]!r} is the only non-numeric label); "
                        f"name a label column (one of {list(LABEL_COLUMNS)}) and a text column (one of {list(TEXT_COLUMNS)})")


def normalise_label(raw: str) -> str:
    """Surrounding whitespace removed, inner whitespace collapsed to one space."""
    return re.sub(r"\s+", " ", raw.strip())


def _case_classes(labels: list[str], listed: list[str]) -> dict[str, str]:
    """Each normalised label -> its class's spelling: labels equal but for case are one class, named as
    in ``classes.txt`` (``listed``) or else by its most frequent spelling (a warning lists what was merged)."""
    counts = Counter(labels)
    groups: dict[str, list[str]] = {}
    for label in [*counts, *(x for x in listed if x not in counts)]:
        groups.setdefault(label.casefold(), []).append(label)
    spelling = {}
    for members in groups.values():
        name = next((m for m in members if m in listed), None) or max(members, key=lambda m: (counts[m], -members.index(m)))
        spelling.update({m: name for m in members})
        if len(members) > 1:
            log.warning("labels %s differ only in case: one class '%s'", {m: counts[m] for m in members}, name)
    _warn_near_duplicates({name: sum(counts[m] for m in members) for members in groups.values()
                           for name in [spelling[members[0]]]})
    return spelling


def _alphanumerics(label: str) -> str:
    return re.sub(r"[^0-9a-z]", "", label.casefold())


def _warn_near_duplicates(counts: dict[str, int]) -> None:
    """Warn (with counts) about labels that look like spellings of one class but are kept apart."""
    names = sorted(counts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            alike = _alphanumerics(a) == _alphanumerics(b) or difflib.SequenceMatcher(None, a.casefold(), b.casefold()).ratio() >= 0.85
            if alike and not (a.lstrip("-").isdigit() and b.lstrip("-").isdigit()):
                log.warning("labels '%s' (%d rows) and '%s' (%d rows) look alike but are two classes", a, counts[a], b, counts[b])


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
    return [ln.strip() for ln in names_file.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]


def load_local(folder: Path, train_file: str, test_file: str) -> Dataset:
    """Load a train and a test CSV from ``folder``."""
    train_raw, train_texts = read_csv(_find_file(folder, train_file))
    test_raw, test_texts = read_csv(_find_file(folder, test_file))
    listed = _listed_classes(folder)
    spelling = _case_classes([normalise_label(x) for x in train_raw + test_raw], listed)
    train_raw = [spelling[normalise_label(x)] for x in train_raw]
    test_raw = [spelling[normalise_label(x)] for x in test_raw]
    listed = [spelling[x] for x in listed]
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
    if len(names) < 2:
        raise DataError(f"'{folder}': {len(names)} class ({names}); a classifier needs at least two "
                        "(or a classes.txt listing every class of the federation)")
    index = {label: i for i, label in enumerate(order)}
    to_ids = lambda raw: np.array([index[x] for x in raw], dtype=np.int64)  # noqa: E731
    return Dataset(
        train=Split(train_texts, to_ids(train_raw)),
        test=Split(test_texts, to_ids(test_raw)),
        class_names=names,
        source=f"local:{folder}",
    )


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE or HF_DATASETS_OFFLINE says not to try the Hub."""
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
    if source == "hub" or (source == "auto" and not hub_offline()):
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

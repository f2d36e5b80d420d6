"""Hashed word n-gram bags: the SLM's lexical channel, next to the encoder's embedding.

A frozen sentence encoder averages a text into one vector and loses rare, decisive
words (a ticker, a team, a product name). A bag of word unigrams and bigrams keeps
them. The bags are hashed into a fixed number of buckets, so no vocabulary has to be
agreed on: every client maps the same n-gram to the same bucket without sharing any
text, which is what federated training needs (no global statistics such as IDF).

Words are Unicode-aware: a word is a run of letters, marks and digits of any script (Latin with
accents, Cyrillic, Greek, Arabic, Devanagari, ...), lower-cased after NFC normalisation; in
scripts written without spaces between words (Han, kana, Hangul, Thai) each character is a word,
so their bigrams are character bigrams. On ASCII text this gives exactly the runs of [a-z0-9].

Rows are L2-normalised and stored sparse (CSR); the head reads them through
``dot`` (bags @ W) and ``gradient_rows`` (the rows of bags.T @ G that a batch
touches, so that training updates only those rows: a batch of 64 texts touches a
few thousand of the 2^18 buckets).
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Scripts written without spaces between words: each character is a word.
UNSPACED = ((0x0E00, 0x0E7F), (0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF))


def _class_of(predicate) -> str:
    """A regex character class of the Basic Multilingual Plane's code points that satisfy ``predicate``."""
    ranges, start = [], None
    for code in range(0x10000):
        inside = predicate(code)
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            ranges.append((start, code - 1))
            start = None
    return "[" + "".join(f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges) + "]"


def _unspaced(code: int) -> bool:
    return any(a <= code <= b for a, b in UNSPACED)


def _word_char(code: int) -> bool:
    return not _unspaced(code) and unicodedata.category(chr(code))[0] in "LMN"


@lru_cache(maxsize=1)
def _word_pattern() -> re.Pattern:
    # Built once per process, when first needed (scanning the plane's categories takes 0.3 s).
    return re.compile(f"{_class_of(_unspaced)}|{_class_of(_word_char)}+")


def words_of(text: str) -> list[str]:
    """The text's words, lower-cased (see the module docstring)."""
    return _word_pattern().findall(unicodedata.normalize("NFC", text).lower())


def ngram_buckets(text: str, buckets: int) -> list[int]:
    """Distinct hash buckets of the text's lower-cased word unigrams and bigrams."""
    words = words_of(text)
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    # crc32, not hash(): Python salts str hashes per process, and every client must agree.
    return sorted({zlib.crc32(g.encode("utf-8")) % buckets for g in grams})


@dataclass(frozen=True)
class NgramBags:
    """Sparse (CSR) hashed n-gram bags of ``len(self)`` texts, rows of unit L2 norm."""

    indptr: np.ndarray  # (n + 1,) int64: row i is indices[indptr[i]:indptr[i + 1]]
    indices: np.ndarray  # (nnz,) int64 buckets
    values: np.ndarray  # (nnz,) float64
    buckets: int

    @classmethod
    def of(cls, texts: list[str], buckets: int) -> NgramBags:
        rows = [ngram_buckets(t, buckets) for t in texts]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        indices = np.fromiter((b for r in rows for b in r), dtype=np.int64, count=int(indptr[-1]))
        # Each present n-gram weighs 1 before normalising: 1/sqrt(count) per row.
        values = np.repeat(1.0 / np.sqrt(np.maximum(lengths, 1)), lengths)
        return cls(indptr, indices, values, buckets)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def _row_ids(self) -> np.ndarray:
        """The row of every stored entry."""
        return np.repeat(np.arange(len(self)), np.diff(self.indptr))

    def __getitem__(self, rows: np.ndarray) -> NgramBags:
        """The bags of ``rows`` (integer indices or a boolean mask), in that order."""
        rows = np.arange(len(self))[rows]
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts
        take = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
        return NgramBags(np.concatenate([[0], np.cumsum(lengths)]), self.indices[take], self.values[take], self.buckets)

    def dot(self, weights: np.ndarray) -> np.ndarray:
        """bags @ weights: (n, buckets) x (buckets, k) -> (n, k)."""
        out = np.zeros((len(self), weights.shape[1]))
        filled = np.diff(self.indptr) > 0
        if filled.any():
            # Entries are stored row by row, so each row's sum is one segment of a reduceat
            # (empty rows are skipped: reduceat would give them their neighbour's first entry).
            contributions = weights[self.indices] * self.values[:, None]
            out[filled] = np.add.reduceat(contributions, self.indptr[:-1][filled], axis=0)
        return out

    def gradient_rows(self, grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """bags.T @ grad restricted to its non-zero rows: (rows, values of shape (len(rows), k))."""
        rows, slot = np.unique(self.indices, return_inverse=True)
        weighted = grad[self._row_ids()] * self.values[:, None]
        values = np.stack([np.bincount(slot, weighted[:, c], minlength=len(rows)) for c in range(grad.shape[1])], axis=1)
        return rows, values

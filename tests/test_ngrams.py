"""Hashed n-gram bags: the same buckets in every process, and sparse products equal to dense ones."""

import subprocess
import sys

import numpy as np
import pytest

from fedhlm_app.slm.ngrams import NgramBags, ngram_buckets, words_of

TEXTS = ["Oil prices rise as OPEC meets", "Red Sox win the World Series", "", "oil oil OIL"]


def _dense(bags: NgramBags) -> np.ndarray:
    out = np.zeros((len(bags), bags.buckets))
    for i in range(len(bags)):
        lo, hi = bags.indptr[i], bags.indptr[i + 1]
        out[i, bags.indices[lo:hi]] = bags.values[lo:hi]
    return out


def test_every_process_hashes_an_ngram_to_the_same_bucket():
    # Clients run in separate processes: str hash() would differ between them (PYTHONHASHSEED).
    code = "from fedhlm_app.slm.ngrams import ngram_buckets; print(ngram_buckets('Oil prices rise', 4096))"
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        for seed in ("1", "2")
    }
    assert outputs == {f"{ngram_buckets('Oil prices rise', 4096)}\n"}


def test_bags_hold_lowercased_unigrams_and_bigrams_with_unit_norm():
    bags = NgramBags.of(TEXTS, 1 << 20)
    dense = _dense(bags)
    assert len(bags.indices[bags.indptr[0]:bags.indptr[1]]) == 6 + 5  # six words, five bigrams
    assert np.allclose(np.linalg.norm(dense[[0, 1, 3]], axis=1), 1.0)
    assert not dense[2].any()  # an empty text is an empty row
    assert len(bags.indices[bags.indptr[3]:bags.indptr[4]]) == 2  # "oil", "oil oil": distinct n-grams


def test_sparse_products_match_the_dense_matrix():
    rng = np.random.default_rng(0)
    bags = NgramBags.of(TEXTS, 64)
    dense = _dense(bags)
    weights, grad = rng.normal(size=(64, 3)), rng.normal(size=(len(TEXTS), 3))
    assert np.allclose(bags.dot(weights), dense @ weights)
    rows, values = bags.gradient_rows(grad)
    full = np.zeros((64, 3))
    full[rows] = values
    assert np.allclose(full, dense.T @ grad)


@pytest.mark.parametrize("rows", [np.array([3, 0]), np.array([True, False, True, False])])
def test_row_selection_keeps_the_selected_rows_in_order(rows):
    bags = NgramBags.of(TEXTS, 64)
    assert np.array_equal(_dense(bags[rows]), _dense(bags)[rows])


@pytest.mark.parametrize("text, words", [
    ("Zürich's Café, naïve été", ["zürich", "s", "café", "naïve", "été"]),  # accented Latin stays whole
    ("Cafe\u0301 Cafe\u0301", ["café", "café"]),  # a combining accent is normalised (NFC) into its letter
    ("مَرْحَبًا بالعالم", ["مَرْحَبًا", "بالعالم"]),  # Arabic words, with their vowel marks
    ("東京大学の研究", ["東", "京", "大", "学", "の", "研", "究"]),  # no spaces: one word per character
    ("Привет, мир! नमस्ते दुनिया", ["привет", "мир", "नमस्ते", "दुनिया"]),  # Cyrillic, Devanagari with its signs
    ("OPEC's oil_price: $3.50 (up 2%)", ["opec", "s", "oil", "price", "3", "50", "up", "2"]),  # ASCII: runs of [a-z0-9]
])
def test_words_are_unicode_aware(text, words):
    assert words_of(text) == words


def test_cjk_and_arabic_texts_get_ngram_bags():
    bags = NgramBags.of(["東京大学の研究", "مرحبا بالعالم"], 1 << 20)
    assert np.diff(bags.indptr).tolist() == [7 + 6, 2 + 1]  # character unigrams and bigrams; two words and their bigram

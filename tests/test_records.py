"""Fast Array conversions: byte-identical to Flower's, and lossless."""

import numpy as np
import pytest
from flwr.app import Array

from fedhlm_app.fl.records import to_array, to_numpy

CASES = [
    np.arange(7, dtype=np.int64),
    np.random.default_rng(0).normal(size=(4, 384)).astype(np.float16),
    np.array([True, False, True]),
    np.zeros((0, 5), dtype=np.float32),
    np.array(3.5),
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),  # Fortran order in, C order on the wire
]


@pytest.mark.parametrize("a", CASES, ids=lambda a: f"{a.dtype}{a.shape}")
def test_to_array_matches_flower_and_round_trips(a):
    ours = to_array(a)
    flowers = Array(a if a.flags.c_contiguous else np.ascontiguousarray(a))
    assert ours.data == flowers.data and ours.dtype == flowers.dtype and tuple(ours.shape) == tuple(flowers.shape)
    back = to_numpy(ours)
    assert back.dtype == a.dtype and back.shape == a.shape and np.array_equal(back, a)
    back[...] = 0 if back.size else back  # a writable copy, as Flower's .numpy() gives
    assert np.array_equal(to_numpy(ours), a)


def test_to_numpy_reads_flowers_own_arrays_including_fortran_order():
    fortran = np.asfortranarray(np.arange(6).reshape(2, 3))
    flowers = Array(fortran)  # np.save keeps Fortran order in the header: falls back to Flower
    assert np.array_equal(to_numpy(flowers), fortran)

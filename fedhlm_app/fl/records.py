"""Arrays in Flower records and back, byte for byte as Flower's own ``Array(ndarray)`` / ``.numpy()``."""

from __future__ import annotations

import math
from functools import lru_cache
from io import BytesIO

import numpy as np
from flwr.app import Array, ArrayRecord

# Flower stores an Array as .npy bytes and parses the header (with ast.literal_eval) on every
# .numpy() call, and builds it on every Array(ndarray): 0.1-0.2 ms each, about 30 times per client
# and round, most of a round's cost with 200 clients (bench/rounds.py). The same bytes, with
# headers built and parsed once per (dtype, shape) by numpy's own format code:
NPY_V1 = b"\x93NUMPY\x01\x00"


@lru_cache(maxsize=512)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    buffer = BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


@lru_cache(maxsize=512)
def _parse_npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    return np.lib.format.read_array_header_1_0(BytesIO(header[len(NPY_V1):]))


def to_array(ndarray: np.ndarray) -> Array:
    """``Array(ndarray)``, byte for byte (npy 1.0, C order)."""
    a = ndarray if ndarray.flags.c_contiguous else np.ascontiguousarray(ndarray)  # keeps 0-d arrays 0-d
    if a.dtype.hasobject:
        return Array(a)  # never happens here; Flower's path refuses pickles
    header = _npy_header(np.lib.format.dtype_to_descr(a.dtype), a.shape)
    return Array(dtype=str(a.dtype), shape=tuple(a.shape), stype="numpy.ndarray", data=header + a.tobytes())


def to_numpy(array: Array) -> np.ndarray:
    """``array.numpy()`` (a writable copy); other npy versions and layouts go through Flower."""
    data = array.data
    if array.stype != "numpy.ndarray" or not data.startswith(NPY_V1):
        return array.numpy()
    end = len(NPY_V1) + 2 + int.from_bytes(data[len(NPY_V1) : len(NPY_V1) + 2], "little")
    shape, fortran_order, dtype = _parse_npy_header(data[:end])
    if fortran_order or dtype.hasobject:
        return array.numpy()
    return np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=end).reshape(shape).copy()


def arrays_record(arrays: list[np.ndarray]) -> ArrayRecord:
    return ArrayRecord({str(i): to_array(a) for i, a in enumerate(arrays)})  # Flower's keys for a list


def record_arrays(record: ArrayRecord) -> list[np.ndarray]:
    return [to_numpy(a) for a in record.values()]


def named_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: to_array(v) for k, v in arrays.items()})


def record_named_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: to_numpy(v) for k, v in record.items()}

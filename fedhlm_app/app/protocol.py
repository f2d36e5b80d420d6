"""Conversions between the numpy core and Flower records (adapter layer).

Message contents use these keys: ``"arrays"`` (head weights or a threshold),
``"config"`` (round settings), ``"metrics"`` (numbers for aggregation),
``"escalation"`` (items sent to the LLM) and ``"feedback"`` (its answers).
"""

from __future__ import annotations

import math
from functools import lru_cache
from io import BytesIO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedhlm_app.oracle.base import EscalationBatch
from fedhlm_app.routing.p2p import ClassSums
from fedhlm_app.routing.speculative import Verdict


def serialized_size(content: RecordDict) -> int:
    """Bytes of the content as Flower serializes it on the wire (protobuf)."""
    return recorddict_to_proto(content).ByteSize()


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


def array_items(record: ArrayRecord, key: str) -> int:
    """Length of an array of a record, read from its metadata (no decoding)."""
    return int(record[key].shape[0])


def pack_escalation(batch: EscalationBatch) -> RecordDict:
    """Items for the LLM: ids, distributions and drafts as arrays, texts as strings."""
    arrays = ArrayRecord(
        {
            "ids": to_array(np.asarray(batch.ids, dtype=np.int64)),
            "probs": to_array(np.asarray(batch.probs, dtype=np.float32)),
            "drafts": to_array(np.asarray(batch.drafts, dtype=np.int64)),
        }
    )
    return RecordDict({"escalation": arrays, "texts": ConfigRecord({"texts": list(batch.texts)})})


def unpack_escalation(content: RecordDict) -> EscalationBatch:
    arrays = content["escalation"]
    texts = content["texts"]["texts"] if "texts" in content["texts"] else []
    return EscalationBatch(
        ids=to_numpy(arrays["ids"]),
        texts=list(texts),
        probs=to_numpy(arrays["probs"]),
        drafts=to_numpy(arrays["drafts"]),
    )


def pack_feedback(ids: np.ndarray, verdict: Verdict) -> ArrayRecord:
    """The LLM's answer per item: rejection probability, accept flag, final class."""
    return ArrayRecord(
        {
            "ids": to_array(np.asarray(ids, dtype=np.int64)),
            "beta": to_array(np.asarray(verdict.beta, dtype=np.float32)),
            "accepted": to_array(np.asarray(verdict.accepted, dtype=np.bool_)),
            "final": to_array(np.asarray(verdict.final, dtype=np.int64)),
        }
    )


def unpack_feedback(record: ArrayRecord) -> tuple[np.ndarray, Verdict]:
    return to_numpy(record["ids"]), Verdict(
        beta=to_numpy(record["beta"]).astype(np.float64),
        accepted=to_numpy(record["accepted"]).astype(bool),
        final=to_numpy(record["final"]),
    )


def pack_prototypes(own: np.ndarray, neighbours: list[np.ndarray]) -> ArrayRecord:
    """A cluster's class prototypes and its neighbours' (float16: cosines need no more)."""
    stacked = np.stack(neighbours) if neighbours else np.zeros((0, *own.shape))
    return ArrayRecord({"own": to_array(own.astype(np.float16)), "neighbours": to_array(stacked.astype(np.float16))})


def unpack_prototypes(record: ArrayRecord) -> tuple[np.ndarray, list[np.ndarray]]:
    return to_numpy(record["own"]).astype(np.float64), [n.astype(np.float64) for n in to_numpy(record["neighbours"])]


def pack_class_sums(sums: ClassSums) -> ArrayRecord:
    """A client's per-class embedding sums (float16 halves the bytes; 1e-3 relative is plenty)."""
    return ArrayRecord({"sums": to_array(sums.sums.astype(np.float16)), "counts": to_array(sums.counts.astype(np.float32))})


def unpack_class_sums(record: ArrayRecord) -> ClassSums:
    return ClassSums(to_numpy(record["sums"]).astype(np.float64), to_numpy(record["counts"]).astype(np.float64))

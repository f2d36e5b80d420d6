"""Conversions between the numpy core and Flower records (adapter layer).

Message contents use these keys: ``"arrays"`` (head weights or a threshold),
``"config"`` (round settings), ``"metrics"`` (numbers for aggregation),
``"escalation"`` (items sent to the LLM) and ``"feedback"`` (its answers).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedhlm_app.oracle import EscalationBatch
from fedhlm_app.p2p import ClassSums
from fedhlm_app.speculative import Verdict


def serialized_size(content: RecordDict) -> int:
    """Bytes of the content as Flower serializes it on the wire (protobuf)."""
    return recorddict_to_proto(content).ByteSize()


def arrays_record(arrays: list[np.ndarray]) -> ArrayRecord:
    return ArrayRecord([np.ascontiguousarray(a) for a in arrays])


def record_arrays(record: ArrayRecord) -> list[np.ndarray]:
    return record.to_numpy_ndarrays()


def pack_escalation(batch: EscalationBatch) -> RecordDict:
    """Items for the LLM: ids, distributions and drafts as arrays, texts as strings."""
    arrays = ArrayRecord(
        {
            "ids": Array(np.asarray(batch.ids, dtype=np.int64)),
            "probs": Array(np.asarray(batch.probs, dtype=np.float32)),
            "drafts": Array(np.asarray(batch.drafts, dtype=np.int64)),
        }
    )
    return RecordDict({"escalation": arrays, "texts": ConfigRecord({"texts": list(batch.texts)})})


def unpack_escalation(content: RecordDict) -> EscalationBatch:
    arrays = content["escalation"]
    texts = content["texts"]["texts"] if "texts" in content["texts"] else []
    return EscalationBatch(
        ids=arrays["ids"].numpy(),
        texts=list(texts),
        probs=arrays["probs"].numpy(),
        drafts=arrays["drafts"].numpy(),
    )


def pack_feedback(ids: np.ndarray, verdict: Verdict) -> ArrayRecord:
    """The LLM's answer per item: rejection probability, accept flag, final class."""
    return ArrayRecord(
        {
            "ids": Array(np.asarray(ids, dtype=np.int64)),
            "beta": Array(np.asarray(verdict.beta, dtype=np.float32)),
            "accepted": Array(np.asarray(verdict.accepted, dtype=np.bool_)),
            "final": Array(np.asarray(verdict.final, dtype=np.int64)),
        }
    )


def unpack_feedback(record: ArrayRecord) -> tuple[np.ndarray, Verdict]:
    return record["ids"].numpy(), Verdict(
        beta=record["beta"].numpy().astype(np.float64),
        accepted=record["accepted"].numpy().astype(bool),
        final=record["final"].numpy(),
    )


def pack_prototypes(own: np.ndarray, neighbours: list[np.ndarray]) -> ArrayRecord:
    """A cluster's class prototypes and its neighbours' (float16: cosines need no more)."""
    stacked = np.stack(neighbours) if neighbours else np.zeros((0, *own.shape))
    return ArrayRecord({"own": Array(own.astype(np.float16)), "neighbours": Array(stacked.astype(np.float16))})


def unpack_prototypes(record: ArrayRecord) -> tuple[np.ndarray, list[np.ndarray]]:
    return record["own"].numpy().astype(np.float64), [n.astype(np.float64) for n in record["neighbours"].numpy()]


def pack_class_sums(sums: ClassSums) -> ArrayRecord:
    """A client's per-class embedding sums (float16 halves the bytes; 1e-3 relative is plenty)."""
    return ArrayRecord({"sums": Array(sums.sums.astype(np.float16)), "counts": Array(sums.counts.astype(np.float32))})


def unpack_class_sums(record: ArrayRecord) -> ClassSums:
    return ClassSums(record["sums"].numpy().astype(np.float64), record["counts"].numpy().astype(np.float64))

"""Keeping clients' copies of a federated model in step with few bytes: the server's side.

Every client holds a replica of the model its cluster trains (``held``). A round sends each
cluster only what changed between the model the server aggregated and the replica
(``broadcast``: the largest rows of the difference, quantized), and the replica moves by exactly
what was sent, on both ends. Clients train from their replica and send back a compressed delta
(``client_model`` rebuilds their model from it); an edge sends the cloud its aggregate the same
way (``edge_upload``, with the edge's error feedback). The difference the broadcast leaves out
stays in ``target - held`` and goes out in later rounds: error feedback for the downlink.

A client that has not applied the cluster's previous broadcast (it joined late, failed a round, or
the server resumed from a checkpoint) gets the replica whole, exactly (``message_for``).

With ``codec = None`` nothing is compressed: every message carries the whole model in float32,
every round, as Flower's own strategies send it (the uncompressed baseline).
Pure numpy: no Flower imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedhlm_app.fl.compression import (
    EXACT,
    LEVELS,
    VALUE_FORMATS,
    Codec,
    ErrorFeedback,
    Params,
    RowTable,
    add,
    decode_model,
    encode_model,
    pack_rows,
    subtract,
    table_shape,
    unpack_rows,
)

FROM_ZERO = -1  # the base of a message that carries a whole model


@dataclass(frozen=True)
class ModelDelta:
    """A model message: ``tables`` added to the model of version ``base`` (``FROM_ZERO``: to zeros) give version ``version``."""

    base: int
    version: int
    tables: list[RowTable]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Four arrays, whatever the number of tables (each array costs a header on the wire): ``meta``
        (base, version, then per table: value format, row count or -1 for every row, bytes of its row
        indices and codes, ndim, shape), the packed ``rows``, the ``codes`` as bytes and the ``scales``."""
        meta, rows, codes, scales = [self.base, self.version, len(self.tables)], [], [], []
        for t in self.tables:
            packed = pack_rows(t.rows) if t.rows is not None else np.zeros(0, np.uint8)
            raw = np.frombuffer(np.ascontiguousarray(t.codes).tobytes(), np.uint8)
            meta += [VALUE_FORMATS.index(t.values), -1 if t.rows is None else len(t.rows), packed.size, raw.size, len(t.shape), *t.shape]
            rows.append(packed)
            codes.append(raw)
            scales.append(np.asarray(t.scales, np.uint8))
        cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
        return {"meta": np.array(meta, np.int64), "rows": cat(rows, np.uint8), "codes": cat(codes, np.uint8),
                "scales": cat(scales, np.uint8)}

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray]) -> ModelDelta:
        """The inverse of ``to_arrays``; ``ValueError`` on anything that does not add up (a malformed message)."""
        try:
            meta = [int(v) for v in arrays["meta"]]
            rows, codes, scales = (np.asarray(arrays[k]) for k in ("rows", "codes", "scales"))
            base, version, count = meta[:3]
            at, row_at, code_at, scale_at, tables = 3, 0, 0, 0, []
            for _ in range(count):
                fmt, num_rows, row_bytes, code_bytes, ndim = meta[at : at + 5]
                shape = tuple(meta[at + 5 : at + 5 + ndim])
                at += 5 + ndim
                values = VALUE_FORMATS[fmt]
                every_row = num_rows == -1
                height, width = table_shape(shape)
                num_rows = height if every_row else num_rows
                indices = None if every_row else unpack_rows(rows[row_at : row_at + row_bytes], num_rows)
                raw = codes[code_at : code_at + code_bytes].tobytes()
                dtype = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8, "int4": np.uint8}[values]
                coded = np.frombuffer(raw, dtype)
                coded = coded if values == "int4" else coded.reshape(num_rows, width)
                num_scales = num_rows if values in LEVELS else 0
                tables.append(RowTable(shape, values, indices, coded, scales[scale_at : scale_at + num_scales]))
                row_at, code_at, scale_at = row_at + row_bytes, code_at + code_bytes, scale_at + num_scales
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"malformed model message ({type(exc).__name__}: {exc})") from None
        if at != len(meta) or (row_at, code_at, scale_at) != (rows.size, codes.size, scales.size):
            raise ValueError("malformed model message: its parts do not add up")
        return ModelDelta(base, version, tables)

    def apply(self, held: Params | None, held_version: int | None) -> Params:
        """The model this message makes of ``held`` (ValueError when it was meant for another version)."""
        delta = decode_model(self.tables)
        if self.base == FROM_ZERO:
            return delta
        if held is None or held_version != self.base:
            raise ValueError(f"model delta from version {self.base}, but the replica is at version {held_version}")
        return add(held, delta)


def whole(params: Params, version: int = 0) -> ModelDelta:
    """A whole model, exactly: its non-zero rows in float32."""
    return ModelDelta(FROM_ZERO, version, encode_model(params, EXACT))


def uncompressed(params: Params) -> ModelDelta:
    """A whole model as uncompressed training sends it: every row, in float32."""
    return ModelDelta(FROM_ZERO, 0, encode_model(params, EXACT, every_row=True))


@dataclass
class ModelSync:
    """What each cluster's clients hold of one model, and what each node has applied."""

    codec_up: Codec | None  # client and edge uploads; None: whole models
    codec_down: Codec | None  # broadcasts
    held: dict[int, Params] = field(default_factory=dict)  # cluster -> the replica its clients hold
    version: dict[int, int] = field(default_factory=dict)  # cluster -> the replica's version
    synced: dict[int, tuple[int, int]] = field(default_factory=dict)  # node -> (cluster, version) it holds
    edge_feedback: dict[int, ErrorFeedback] = field(default_factory=dict)  # cluster -> its edge's unsent residual

    @property
    def compressed(self) -> bool:
        return self.codec_down is not None

    def broadcast(self, cluster: int, target: Params, codec: Codec | None = None) -> ModelDelta:
        """This round's message for ``cluster``: what moves its replica towards ``target`` (compressed by
        ``codec``, by default the broadcast codec); the replica moves."""
        if not self.compressed:
            self.held[cluster] = [np.asarray(t, np.float32) for t in target]
            return uncompressed(self.held[cluster])
        if cluster not in self.held:  # first contact: the model itself, exactly
            self.held[cluster], self.version[cluster] = [np.asarray(t, np.float32).copy() for t in target], 0
            return whole(self.held[cluster])
        tables = encode_model(subtract(target, self.held[cluster]), codec or self.codec_down)
        base = self.version[cluster]
        self.held[cluster] = add(self.held[cluster], decode_model(tables))
        self.version[cluster] = base + 1
        return ModelDelta(base, base + 1, tables)

    def replicas_agree(self) -> bool:
        """Whether every cluster's clients hold the same model (they do unless edge rounds set them apart)."""
        first, *others = self.held.values()
        return all(all(np.array_equal(a, b) for a, b in zip(first, other)) for other in others)

    def message_for(self, node: int, cluster: int, broadcast: ModelDelta) -> ModelDelta:
        """The cluster's broadcast when ``node`` holds the version it applies to, else the replica whole."""
        if broadcast.base == FROM_ZERO or self.synced.get(node) == (cluster, broadcast.base):
            return broadcast
        return whole(self.held[cluster], self.version[cluster])

    def acknowledge(self, node: int, cluster: int) -> None:
        """``node`` answered this round: it holds the cluster's replica."""
        if self.compressed:
            self.synced[node] = (cluster, self.version[cluster])

    def forget_nodes(self) -> None:
        """After a resume nodes are new: each gets the replica whole first."""
        self.synced.clear()

    def client_model(self, cluster: int, update: ModelDelta) -> Params:
        """A client's trained model, rebuilt from its upload (ValueError when malformed or stale)."""
        if update.base == FROM_ZERO:
            return decode_model(update.tables)
        return update.apply(self.held.get(cluster), self.version.get(cluster))

    def edge_upload(self, cluster: int, model: Params) -> tuple[ModelDelta, Params]:
        """What an edge sends the cloud for its aggregate ``model``, and the model the cloud rebuilds from it."""
        if not self.compressed:
            return uncompressed(model), model
        feedback = self.edge_feedback.setdefault(cluster, ErrorFeedback())
        base = self.held[cluster]
        tables, sent = feedback.compress(subtract(model, base), self.codec_up)
        return ModelDelta(self.version[cluster], self.version[cluster], tables), add(base, sent)


def client_upload(trained: Params, start: Params, start_version: int, codec: Codec | None,
                  feedback: ErrorFeedback) -> ModelDelta:
    """What a client sends for its ``trained`` model: the compressed delta from the replica it started
    from (with its error feedback), or, uncompressed, the whole model."""
    if codec is None:
        return uncompressed(trained)
    tables, _ = feedback.compress(subtract(trained, start), codec)
    return ModelDelta(start_version, start_version, tables)

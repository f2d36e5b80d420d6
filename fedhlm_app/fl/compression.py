"""Compressed model updates: only the rows that changed travel, quantized, with error feedback.

Pure numpy (no Flower). A model is a list of arrays; each array is a table of rows (its first
axis; a 0-d or 1-d array is one row). A message carries, per array, a ``RowTable``: the indices of
the rows it changes and their values in one of ``VALUE_FORMATS``:

- ``fp32`` exact, ``fp16`` half precision;
- ``int8`` / ``int4``: each row's values as signed integers of 127 / 7 levels times the row's
  scale, int4 packed two to a byte. The scale travels as one byte, a power of ``2^(1/8)``
  (``SCALE_STEPS``) rounded up from the row's largest value / levels: a value is off by at most half
  a step, and a step is at most 9% (``2^(1/8)``) wider than the row's largest value / levels.
  An n-gram row is 4 values, 2 bytes in int4: a float16 scale cost as much again, and one byte
  instead cut the paper setting's training traffic by 14% at the same accuracy.

What travels is a *delta* from a model both ends hold, and only its largest rows: a sender keeps
the ``share`` of its changed rows with the largest L2 norm, in tables of at least
``SPARSE_MIN_ROWS`` rows (the n-gram table: 2^17 rows, of which a client touches about a fifth); smaller arrays (the embedding weights, biases), whose every row changes
in every round, travel whole. What was not sent, and the quantization error, stays in the
sender's ``ErrorFeedback`` and is added to its next delta (Seide et al. 2014; Stich et al. 2018),
so nothing learned is dropped, only delayed.

Row indices travel sorted, as gaps, deflated (zlib): 1-2 bytes a row instead of 8.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

VALUE_FORMATS = ("fp32", "fp16", "int8", "int4")
LEVELS = {"int8": 127, "int4": 7}
# a scale code e in 1..255 is the step 2^((e - SCALE_BIAS) / SCALE_STEPS), from 1.2e-6 to 4096; 0: a row of zeros
SCALE_STEPS, SCALE_BIAS = 8, 159
SPARSE_MIN_ROWS = 4096
Params = list[np.ndarray]


@dataclass(frozen=True)
class Codec:
    """How an update is compressed: its values' format and the share of a large table's changed rows sent."""

    values: str = "int4"
    share: float = 1.0

    def __post_init__(self) -> None:
        if self.values not in VALUE_FORMATS:
            raise ValueError(f"values '{self.values}' is not one of {VALUE_FORMATS}")
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"share {self.share} is not in (0, 1]")


EXACT = Codec("fp32", 1.0)  # lossless: every changed row, in float32


def table_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, row width) of an array of ``shape``."""
    size = int(np.prod(shape))
    return (1, size) if len(shape) < 2 else (shape[0], size // max(shape[0], 1))


def as_table(array: np.ndarray) -> np.ndarray:
    """The array as rows (a view): (rows, row width)."""
    return array.reshape(table_shape(array.shape))


@dataclass(frozen=True)
class RowTable:
    """One array's compressed delta: the rows it changes (sorted; None: every row) and their coded values."""

    shape: tuple[int, ...]
    values: str
    rows: np.ndarray | None
    codes: np.ndarray  # fp32/fp16: (rows, width); int8: (rows, width); int4: packed nibbles, uint8
    scales: np.ndarray  # a scale code (uint8) per row for int8/int4, else empty

    @property
    def num_rows(self) -> int:
        return table_shape(self.shape)[0] if self.rows is None else len(self.rows)

    def decode(self) -> np.ndarray:
        """The dense float32 delta. Raises ``ValueError`` on a table that does not fit its shape (a malformed message)."""
        if self.values not in VALUE_FORMATS:
            raise ValueError(f"unknown value format '{self.values}'")
        out = np.zeros(self.shape, np.float32)
        table = as_table(out)
        height, width = table.shape
        if self.rows is not None:
            rows = self.rows
            if rows.ndim != 1 or (len(rows) and (rows[0] < 0 or rows[-1] >= height or np.any(np.diff(rows) <= 0))):
                raise ValueError(f"row indices are not sorted, distinct and within [0, {height})")
        count = self.num_rows
        values = _dequantize(self.codes, self.scales, self.values, count, width)
        if self.rows is None:
            table[:] = values
        else:
            table[self.rows] = values
        return out


def _dequantize(codes: np.ndarray, scales: np.ndarray, fmt: str, count: int, width: int) -> np.ndarray:
    if fmt == "int4":
        if codes.dtype != np.uint8 or codes.size != (count * width + 1) // 2:
            raise ValueError(f"int4 codes: expected {(count * width + 1) // 2} bytes, got {codes.size} of {codes.dtype}")
        nibbles = np.empty(codes.size * 2, np.int8)
        nibbles[0::2], nibbles[1::2] = codes >> 4, codes & 0x0F
        codes = (nibbles[: count * width] - 8).reshape(count, width)
    elif codes.shape != (count, width):
        raise ValueError(f"codes of shape {codes.shape}, expected {(count, width)}")
    if fmt in LEVELS:
        if scales.shape != (count,):
            raise ValueError(f"{len(scales)} scales for {count} rows")
        return codes.astype(np.float32) * scale_values(scales)[:, None]
    return codes.astype(np.float32)


def scale_values(codes: np.ndarray) -> np.ndarray:
    """The float32 steps that one-byte scale codes stand for (code 0: zero)."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise ValueError(f"scale codes must be uint8, got {codes.dtype}")
    steps = np.exp2((codes.astype(np.float32) - SCALE_BIAS) / SCALE_STEPS)
    return np.where(codes > 0, steps, 0.0).astype(np.float32)


def _quantize(values: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scale codes) of float32 rows."""
    if fmt == "fp32":
        return values.astype(np.float32), np.zeros(0, np.uint8)
    if fmt == "fp16":
        return values.astype(np.float16), np.zeros(0, np.uint8)
    levels = LEVELS[fmt]
    # the step rounded up to a power of 2^(1/8), so the row's largest value still fits in the levels;
    # a row above the largest step is clipped and one below the smallest rounds to few levels (error
    # feedback keeps what is lost in both)
    largest = np.abs(values).max(axis=1) / levels
    with np.errstate(divide="ignore"):
        exponent = np.ceil(SCALE_STEPS * np.log2(largest)) + SCALE_BIAS
    scales = np.where(largest > 0, np.clip(exponent, 1, 255), 0).astype(np.uint8)
    safe = np.where(scales > 0, scale_values(scales), np.inf)
    codes = np.clip(np.rint(values / safe[:, None]), -levels, levels).astype(np.int8)
    if fmt == "int4":
        flat = (codes.ravel() + 8).astype(np.uint8)
        if flat.size % 2:
            flat = np.append(flat, np.uint8(8))  # a zero nibble pads the last byte
        codes = (flat[0::2] << 4) | flat[1::2]
    return codes, scales


def encode(delta: np.ndarray, codec: Codec, every_row: bool = False) -> RowTable:
    """The array's changed rows (their largest ``codec.share`` in a large table), coded; ``every_row``: all rows, in order."""
    table = as_table(np.asarray(delta, dtype=np.float32))
    if every_row:
        codes, scales = _quantize(table, codec.values)
        return RowTable(tuple(delta.shape), codec.values, None, codes, scales)
    norms = np.einsum("ij,ij->i", table, table)
    rows = np.flatnonzero(norms)
    if codec.share < 1.0 and len(table) >= SPARSE_MIN_ROWS:
        keep = int(np.ceil(codec.share * len(rows)))
        if keep < len(rows):
            rows = np.sort(rows[np.argpartition(-norms[rows], keep - 1)[:keep]])
    codes, scales = _quantize(table[rows], codec.values)
    return RowTable(tuple(delta.shape), codec.values, rows, codes, scales)


def encode_model(delta: Params, codec: Codec, every_row: bool = False) -> list[RowTable]:
    return [encode(d, codec, every_row) for d in delta]


def decode_model(tables: list[RowTable]) -> Params:
    return [t.decode() for t in tables]


def add(base: Params, delta: Params) -> Params:
    """``base + delta`` in the base's dtypes (float32 for every model here)."""
    return [(b + d).astype(b.dtype, copy=False) for b, d in zip(base, delta)]


def subtract(model: Params, base: Params) -> Params:
    return [np.asarray(m, np.float32) - np.asarray(b, np.float32) for m, b in zip(model, base)]


@dataclass
class ErrorFeedback:
    """A sender's memory of what it has not sent yet: added to its next delta before compressing."""

    residual: Params | None = None

    def compress(self, delta: Params, codec: Codec) -> tuple[list[RowTable], Params]:
        """The tables to send for ``delta`` plus the residual, and what the receiver decodes from them."""
        wanted = delta if self.residual is None else [d + r for d, r in zip(delta, self.residual)]
        tables = encode_model(wanted, codec)
        sent = decode_model(tables)
        self.residual = [w - s for w, s in zip(wanted, sent)]
        return tables, sent


# ---- row indices on the wire ------------------------------------------------------------------

def pack_rows(rows: np.ndarray) -> np.ndarray:
    """Sorted row indices as deflated gaps (uint8 bytes): uint16 gaps when they fit, else uint32."""
    gaps = np.diff(rows, prepend=-1)
    wide = bool(len(gaps)) and int(gaps.max()) > np.iinfo(np.uint16).max
    raw = gaps.astype(np.uint32 if wide else np.uint16).tobytes()
    return np.frombuffer(bytes([4 if wide else 2]) + zlib.compress(raw, 6), np.uint8)


def unpack_rows(packed: np.ndarray, count: int) -> np.ndarray:
    """The row indices ``pack_rows`` packed; ``ValueError`` when they do not decode to ``count`` rows."""
    data = np.asarray(packed, np.uint8).tobytes()
    if not data or data[0] not in (2, 4):
        raise ValueError("row indices: unknown width")
    try:
        raw = zlib.decompress(data[1:])
    except zlib.error as exc:
        raise ValueError(f"row indices: {exc}") from None
    gaps = np.frombuffer(raw, np.uint32 if data[0] == 4 else np.uint16)
    if len(gaps) != count:
        raise ValueError(f"row indices: {len(gaps)} for {count} rows")
    return np.cumsum(gaps.astype(np.int64)) - 1

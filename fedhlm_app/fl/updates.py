"""What a valid client update looks like, checked before it reaches any aggregation rule.

A reply can be broken (a bug, a corrupted message) or malicious: wrong number of
arrays, wrong shapes or types, NaN or infinite values, values out of range (a
threshold outside [0, 1]), a non-positive or non-finite sample count, metrics that
are not finite numbers. One such update would poison a weighted mean, so the
strategy drops it, logs the node id and the reason, and aggregates the rest.
Bounding the effect of *valid-looking* but hostile values is the job of the
robust edge rules (median, trimmed mean).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class UpdateSpec:
    """The arrays a valid update holds: their shapes and the range of every value."""

    name: str  # what is aggregated (for the log): "head", "threshold"
    shapes: tuple[tuple[int, ...], ...]
    low: float = -math.inf
    high: float = math.inf

    @classmethod
    def like(cls, name: str, params: list[np.ndarray], low: float = -math.inf, high: float = math.inf) -> UpdateSpec:
        """The spec of updates shaped like ``params`` (the current global model)."""
        return cls(name, tuple(tuple(p.shape) for p in params), low, high)

    def problem(self, params: list[np.ndarray], weight: Any, metrics: Mapping[str, Any]) -> str | None:
        """Why this update must be rejected, or None when it is valid."""
        if len(params) != len(self.shapes):
            return f"{len(params)} arrays, expected {len(self.shapes)}"
        for i, (array, shape) in enumerate(zip(params, self.shapes)):
            if array.dtype.kind not in "fiu":
                return f"array {i} has dtype {array.dtype}, expected numbers"
            if array.shape != shape:
                return f"array {i} has shape {array.shape}, expected {shape}"
            if not np.all(np.isfinite(array)):
                return f"array {i} has non-finite values"
            if array.size and (array.min() < self.low or array.max() > self.high):
                return f"array {i} has values outside [{self.low}, {self.high}] (min {array.min():.4g}, max {array.max():.4g})"
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            return f"num-examples = {weight!r}, expected a finite number > 0"
        for key, value in metrics.items():
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                return f"metric '{key}' = {value!r} is not finite"
        return None

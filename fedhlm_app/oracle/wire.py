"""The oracle service's JSON format, checked on both sides.

``POST /v1/verify``
    request  ``{"texts": [str], "probs": [[float] * C], "drafts": [int]}``
    reply    ``{"answered": [bool], "q": [[float] | null], "accepted": [bool | null],
              "final": [int | null], "beta": [float | null]}``
``POST /v1/distribution``
    request  ``{"texts": [str]}``;  reply ``{"q": [[float] | null]}``
``GET /health``
    reply    ``{"status": "ok", "backend": str, "classes": [str], "max_batch": int, "auth": bool}``

Errors are ``{"error": {"code": str, "message": str}}`` with a 4xx status for a
bad request and 503 when the backend fails; ``WireError`` carries both.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedhlm_app.oracle.base import SUM_TOLERANCE, EscalationBatch, OracleError, Verification
from fedhlm_app.routing.speculative import Verdict


class WireError(ValueError):
    """A request the service refuses: HTTP status, error code and a message for the caller."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": str(self)}}


def _bad(message: str) -> WireError:
    return WireError(400, "bad_request", message)


def _texts(request: Any, max_items: int) -> list[str]:
    if not isinstance(request, dict):
        raise _bad("the body must be a JSON object")
    texts = request.get("texts")
    if not isinstance(texts, list):
        raise _bad("'texts' must be a list of strings")
    if len(texts) > max_items:
        raise WireError(413, "batch_too_large", f"{len(texts)} items; this service takes at most {max_items} per request")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise _bad(f"texts[{bad}] is not a string")
    return texts


def parse_distribution_request(request: Any, max_items: int) -> list[str]:
    return _texts(request, max_items)


def parse_verify_request(request: Any, num_classes: int, max_items: int) -> EscalationBatch:
    """The escalated items of a verify request; ``WireError`` names the first problem."""
    texts = _texts(request, max_items)
    probs, drafts = request.get("probs"), request.get("drafts")
    if not isinstance(probs, list) or not isinstance(drafts, list):
        raise _bad("'probs' (a list of distributions) and 'drafts' (a list of class indices) are required")
    if not len(texts) == len(probs) == len(drafts):
        raise _bad(f"texts, probs and drafts differ in length ({len(texts)}, {len(probs)}, {len(drafts)})")
    for i, row in enumerate(probs):
        if not isinstance(row, list) or len(row) != num_classes:
            raise _bad(f"probs[{i}] must be a list of {num_classes} numbers")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in row):
            raise _bad(f"probs[{i}] has a negative, non-finite or non-numeric entry")
        if abs(sum(row) - 1.0) > SUM_TOLERANCE:
            raise _bad(f"probs[{i}] sums to {sum(row):.6f}, not 1")
    for i, d in enumerate(drafts):
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < num_classes:
            raise _bad(f"drafts[{i}] = {d!r} is not a class index in [0, {num_classes})")
    return EscalationBatch(
        ids=np.arange(len(texts)), texts=texts, probs=np.array(probs, dtype=np.float64).reshape(len(texts), num_classes),
        drafts=np.array(drafts, dtype=np.int64),
    )


def verify_request(batch: EscalationBatch) -> dict[str, Any]:
    return {"texts": list(batch.texts), "probs": np.asarray(batch.probs, dtype=float).tolist(), "drafts": np.asarray(batch.drafts).tolist()}


def _per_item(answered: np.ndarray, values: np.ndarray) -> list[Any]:
    """Values of the answered items in batch order, null for the others."""
    out: list[Any] = [None] * len(answered)
    for slot, value in zip(np.flatnonzero(answered), values.tolist()):
        out[slot] = value
    return out


def distribution_reply(q: np.ndarray, answered: np.ndarray) -> dict[str, Any]:
    return {"q": _per_item(answered, q[answered])}


def verify_reply(v: Verification) -> dict[str, Any]:
    q = v.q if v.q is not None else np.full((len(v.answered), 0), np.nan)
    return {
        "answered": v.answered.tolist(),
        "q": _per_item(v.answered, q[v.answered]),
        "accepted": _per_item(v.answered, v.verdict.accepted),
        "final": _per_item(v.answered, v.verdict.final),
        "beta": _per_item(v.answered, v.verdict.beta),
        **({"failure": v.failure} if v.failure else {}),
    }


def _rows(rows: list[Any], num_classes: int) -> np.ndarray:
    """Per-item distributions with null rows (no answer) as NaN rows."""
    return np.array([row if row is not None else [math.nan] * num_classes for row in rows], dtype=np.float64)


def parse_verify_reply(reply: Any, n: int, num_classes: int) -> Verification:
    """A service's verify reply as a ``Verification``; ``OracleError`` when it is malformed."""
    try:
        answered = np.array(reply["answered"], dtype=bool)
        if answered.shape != (n,):
            raise ValueError(f"'answered' has {answered.size} entries for {n} items")
        pick = lambda key, dtype: np.array([reply[key][i] for i in np.flatnonzero(answered)], dtype=dtype)  # noqa: E731
        verdict = Verdict(beta=pick("beta", np.float64), accepted=pick("accepted", bool), final=pick("final", np.int64))
        if np.any((verdict.final < 0) | (verdict.final >= num_classes)) or np.any(~np.isfinite(verdict.beta)):
            raise ValueError("a final class or beta is out of range")
        if len(reply["beta"]) != n or len(reply["final"]) != n:
            raise ValueError("per-item lists differ in length")
        q = _rows(reply.get("q") or [None] * n, num_classes)
        if q.shape != (n, num_classes):
            raise ValueError(f"'q' has shape {q.shape}, expected {(n, num_classes)}")
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise OracleError(f"malformed verify reply: {type(exc).__name__}: {exc}") from None
    failure = "" if answered.all() else str(reply.get("failure", "the service left items unanswered"))
    return Verification(answered, verdict, failure, q)


def parse_distribution_reply(reply: Any, n: int, num_classes: int) -> np.ndarray:
    """q from a distribution reply (NaN rows where the service had no answer)."""
    try:
        rows = reply["q"]
        if len(rows) != n:
            raise ValueError(f"{len(rows)} rows for {n} texts")
        return _rows(rows, num_classes).reshape(n, num_classes)
    except (KeyError, TypeError, ValueError) as exc:
        raise OracleError(f"malformed distribution reply: {type(exc).__name__}: {exc}") from None

"""The oracle service's JSON format: pydantic models checked on both sides.

``POST /v1/verify``
    request  ``VerifyRequest``  ``{"texts": [str], "probs": [[float] * C], "drafts": [int]}``
    reply    ``VerifyReply``    ``{"answered": [bool], "q": [[float] | null], "accepted": [bool | null],
                                 "final": [int | null], "beta": [float | null], "failure": str?}``
``POST /v1/distribution``
    request  ``DistributionRequest`` ``{"texts": [str]}``;  reply ``DistributionReply`` ``{"q": [[float] | null]}``
``GET /health``
    reply    ``Health`` ``{"status": "ok", "backend": str, "classes": [str], "max_batch": int, "auth": bool}``

Errors are ``ErrorReply`` ``{"error": {"code": str, "message": str}}`` with a 4xx
status for a bad request and 503 when the backend fails; ``WireError`` carries
both. The models check types and shapes; what depends on the served dataset
(C classes, the batch limit) is checked by ``escalation_batch`` and ``texts_of``.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr, ValidationError, model_validator

from fedhlm_app.oracle.base import SUM_TOLERANCE, EscalationBatch, OracleError, Verification
from fedhlm_app.routing.speculative import Verdict

Probability = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
Number = Annotated[float, Field(allow_inf_nan=False, strict=True)]


class DistributionRequest(BaseModel):
    texts: list[StrictStr] = Field(description="the escalated texts")


class VerifyRequest(DistributionRequest):
    probs: list[list[Probability]] = Field(description="the SLM's class distribution p of each text")
    drafts: list[StrictInt] = Field(description="the SLM's draft class of each text")

    @model_validator(mode="after")
    def _same_lengths(self) -> VerifyRequest:
        if not len(self.texts) == len(self.probs) == len(self.drafts):
            raise ValueError(f"texts, probs and drafts differ in length ({len(self.texts)}, {len(self.probs)}, {len(self.drafts)})")
        return self


class VerifyReply(BaseModel):
    """Per item, in request order; null where the backend had no answer (the item keeps its draft)."""

    answered: list[StrictBool]
    q: list[list[Number] | None]
    accepted: list[StrictBool | None]
    final: list[StrictInt | None]
    beta: list[Number | None]
    failure: str | None = Field(None, description="why items went unanswered")


class DistributionReply(BaseModel):
    q: list[list[Number] | None]


class Health(BaseModel):
    status: str
    backend: str
    classes: list[str]
    max_batch: int
    auth: bool


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorReply(BaseModel):
    error: ErrorDetail


class WireError(ValueError):
    """A request the service refuses: HTTP status, error code and a message for the caller."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code

    def body(self) -> dict[str, Any]:
        return ErrorReply(error=ErrorDetail(code=self.code, message=str(self))).model_dump()


def describe(errors: list[Any]) -> str:
    """pydantic's errors as one line naming the first problem, e.g. ``'probs[0][1]': Input should be ...``."""
    first = errors[0]
    loc = [p for p in first["loc"] if p != "body"]  # FastAPI prefixes where the value came from
    if not loc and first["type"] in ("model_type", "model_attributes_type"):
        return "the body must be a JSON object (Content-Type: application/json or none)"
    path = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"'{path}': {first['msg']}{more}" if path else f"{first['msg']}{more}"


def _bad(message: str) -> WireError:
    return WireError(400, "bad_request", message)


def texts_of(request: DistributionRequest, max_items: int) -> list[str]:
    if len(request.texts) > max_items:
        raise WireError(413, "batch_too_large", f"{len(request.texts)} items; this service takes at most {max_items} per request")
    return request.texts


def escalation_batch(request: VerifyRequest, num_classes: int, max_items: int) -> EscalationBatch:
    """The escalated items of a verify request; ``WireError`` names the first problem."""
    texts = texts_of(request, max_items)
    for i, row in enumerate(request.probs):
        if len(row) != num_classes:
            raise _bad(f"probs[{i}] must be a list of {num_classes} numbers")
        if abs(sum(row) - 1.0) > SUM_TOLERANCE:
            raise _bad(f"probs[{i}] sums to {sum(row):.6f}, not 1")
    for i, d in enumerate(request.drafts):
        if not 0 <= d < num_classes:
            raise _bad(f"drafts[{i}] = {d} is not a class index in [0, {num_classes})")
    return EscalationBatch(ids=np.arange(len(texts)), texts=texts, drafts=np.array(request.drafts, dtype=np.int64),
                           probs=np.array(request.probs, dtype=np.float64).reshape(len(texts), num_classes))


def parse_verify_request(body: Any, num_classes: int, max_items: int) -> EscalationBatch:
    """A decoded JSON verify request as escalated items (what the service does in two steps)."""
    try:
        request = VerifyRequest.model_validate(body)
    except ValidationError as exc:
        raise _bad(describe(exc.errors())) from None
    return escalation_batch(request, num_classes, max_items)


def verify_request(batch: EscalationBatch) -> dict[str, Any]:
    return {"texts": list(batch.texts), "probs": np.asarray(batch.probs, dtype=float).tolist(), "drafts": np.asarray(batch.drafts).tolist()}


def _per_item(answered: np.ndarray, values: np.ndarray) -> list[Any]:
    """Values of the answered items in batch order, null for the others."""
    out: list[Any] = [None] * len(answered)
    for slot, value in zip(np.flatnonzero(answered), values.tolist()):
        out[slot] = value
    return out


def distribution_reply(q: np.ndarray, answered: np.ndarray) -> DistributionReply:
    return DistributionReply(q=_per_item(answered, q[answered]))


def verify_reply(v: Verification) -> VerifyReply:
    q = v.q if v.q is not None else np.full((len(v.answered), 0), np.nan)
    return VerifyReply(
        answered=v.answered.tolist(),
        q=_per_item(v.answered, q[v.answered]),
        accepted=_per_item(v.answered, v.verdict.accepted),
        final=_per_item(v.answered, v.verdict.final),
        beta=_per_item(v.answered, v.verdict.beta),
        failure=v.failure or None,
    )


def _rows(rows: list[Any], num_classes: int) -> np.ndarray:
    """Per-item distributions with null rows (no answer) as NaN rows."""
    return np.array([row if row is not None else [np.nan] * num_classes for row in rows], dtype=np.float64)


def parse_verify_reply(body: Any, n: int, num_classes: int) -> Verification:
    """A service's verify reply as a ``Verification``; ``OracleError`` when it is malformed."""
    try:
        reply = VerifyReply.model_validate(body)
        if not len(reply.answered) == len(reply.q) == len(reply.accepted) == len(reply.final) == len(reply.beta) == n:
            raise ValueError(f"the per-item lists do not all have {n} entries")
        answered = np.array(reply.answered, dtype=bool)
        picked = [i for i in range(n) if answered[i]]
        if any(reply.final[i] is None or reply.accepted[i] is None or reply.beta[i] is None for i in picked):
            raise ValueError("an answered item has no verdict")
        verdict = Verdict(beta=np.array([reply.beta[i] for i in picked], dtype=np.float64),
                          accepted=np.array([reply.accepted[i] for i in picked], dtype=bool),
                          final=np.array([reply.final[i] for i in picked], dtype=np.int64))
        if np.any((verdict.final < 0) | (verdict.final >= num_classes)):
            raise ValueError("a final class is out of range")
        q = _rows(reply.q, num_classes)
        if q.shape != (n, num_classes):
            raise ValueError(f"'q' has shape {q.shape}, expected {(n, num_classes)}")
    except ValidationError as exc:
        raise OracleError(f"malformed verify reply: {describe(exc.errors())}") from None
    except ValueError as exc:
        raise OracleError(f"malformed verify reply: {exc}") from None
    failure = "" if answered.all() else reply.failure or "the service left items unanswered"
    return Verification(answered, verdict, failure, q)


def parse_distribution_reply(body: Any, n: int, num_classes: int) -> np.ndarray:
    """q from a distribution reply (NaN rows where the service had no answer)."""
    try:
        rows = DistributionReply.model_validate(body).q
        if len(rows) != n:
            raise ValueError(f"{len(rows)} rows for {n} texts")
        q = _rows(rows, num_classes)
        if q.shape != (n, num_classes):
            raise ValueError(f"'q' has shape {q.shape}, expected {(n, num_classes)}")
        return q
    except ValidationError as exc:
        raise OracleError(f"malformed distribution reply: {describe(exc.errors())}") from None
    except ValueError as exc:
        raise OracleError(f"malformed distribution reply: {exc}") from None

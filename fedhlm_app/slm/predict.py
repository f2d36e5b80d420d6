"""What a client's SLM says about its items once the head is trained: one code path for the
ClientApp and for the evaluation harness.

The head is fixed after training, so a client computes its class probabilities for every
local item once (``head_outputs``) and routes from those. With the local label prior, they
are re-weighted from the pooled label mix to the client's own (``label_prior``): each query
(test, a stream) to the mix estimated from the queries before it (``causal_priors``). The
labelled rows (fit, calibration) keep the global head's probabilities: thresholds are learned
on those, so that a client whose queries leave its own mix still routes by a threshold that
fits the probabilities it then answers from. P2P compares peer answers with the drafts the router
answers queries from, so it also gets the calibration items re-weighted as a query stream
(``CALIBRATION_AS_QUERIES``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedhlm_app.slm.head import SoftmaxHead
from fedhlm_app.slm.label_prior import calibrated, causal_priors, prior_of
from fedhlm_app.slm.local_data import LocalData

SPLITS = ("fit", "calibration", "test")
CALIBRATION_AS_QUERIES = "calibration-as-queries"  # the calibration items re-weighted like queries


@dataclass(frozen=True)
class HeadOutputs:
    """Class probabilities of every local item per split, and the share of queries answered under an estimated label mix."""

    probs: dict[str, np.ndarray]  # split name (``SPLITS``, and ``CALIBRATION_AS_QUERIES`` when asked for) -> (n, C)
    adapted_queries: float  # 0 without the local label prior


def head_outputs(head: SoftmaxHead, data: LocalData, own_counts: np.ndarray | None, pooled_counts: np.ndarray | None,
                 calibration_as_queries: bool = False) -> HeadOutputs:
    """The head's probabilities for every split, re-weighted to the client's label mix when both
    label counts are given (``own_counts``: the client's; ``pooled_counts``: every client's, added up);
    with ``calibration_as_queries`` (P2P's held-out evidence) also ``CALIBRATION_AS_QUERIES``."""
    probs = {s: head.predict_proba(getattr(data, s).inputs) for s in SPLITS}
    if own_counts is None or pooled_counts is None:
        return HeadOutputs({**probs, CALIBRATION_AS_QUERIES: probs["calibration"]} if calibration_as_queries else probs, 0.0)
    own, pooled = prior_of(own_counts), prior_of(pooled_counts)

    def as_queries(stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``stream`` re-weighted query by query to the mix estimated from the ones before it, and whether it was."""
        priors = causal_priors(calibrated(stream, probs["calibration"], data.calibration.y, own, pooled), own, pooled)
        shifted = stream * (priors / pooled)
        return shifted / shifted.sum(axis=1, keepdims=True), np.any(priors != pooled, axis=1)

    test, adapted = as_queries(probs["test"])
    extra = {CALIBRATION_AS_QUERIES: as_queries(probs["calibration"])[0]} if calibration_as_queries else {}
    return HeadOutputs({**probs, "test": test, **extra}, float(np.mean(adapted)) if len(adapted) else 0.0)

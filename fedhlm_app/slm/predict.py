"""What a client's SLM says about its items once the head is trained: one code path for the
ClientApp and for the evaluation harness.

The head is fixed after training, so a client computes its class probabilities for every
local item once (``head_outputs``) and routes from those. With the local label prior, they
are re-weighted from the pooled label mix to the client's own (``label_prior``): always for
its labelled rows (fit, calibration), which follow its mix by definition; for its queries
(test) only if their unlabelled distribution is likelier under its own mix than under the
pooled one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedhlm_app.slm.head import SoftmaxHead
from fedhlm_app.slm.label_prior import likelier_prior, prior_of, shift_prior
from fedhlm_app.slm.local_data import LocalData

SPLITS = ("fit", "calibration", "test")


@dataclass(frozen=True)
class HeadOutputs:
    """Class probabilities of every local item per split, and whether the queries got the client's own label mix."""

    probs: dict[str, np.ndarray]  # split name (``SPLITS``) -> (n, C)
    queries_own_prior: bool


def head_outputs(head: SoftmaxHead, data: LocalData, own_counts: np.ndarray | None, pooled_counts: np.ndarray | None) -> HeadOutputs:
    """The head's probabilities for every split, re-weighted to the client's label mix when both
    label counts are given (``own_counts``: the client's; ``pooled_counts``: every client's, added up)."""
    probs = {s: head.predict_proba(getattr(data, s).inputs) for s in SPLITS}
    if own_counts is None or pooled_counts is None:
        return HeadOutputs(probs, False)
    own, pooled = prior_of(own_counts), prior_of(pooled_counts)
    queries = likelier_prior(probs["test"], own, pooled)
    priors = {"fit": own, "calibration": own, "test": queries}
    return HeadOutputs({s: shift_prior(p, priors[s], pooled) for s, p in probs.items()}, queries is own)

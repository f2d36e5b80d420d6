"""The per-item routing a client runs: local answer, peers, or the LLM (pure numpy).

One implementation, used by the ClientApp (``fedhlm_app.app.node``) and by the evaluation
harness. Tiers index ``p2p.TIERS``: 0 local, 1 own cluster's peers, 2 a neighbour cluster's
peers, 3 the LLM.

- ``Routing.of``: the SLM's distribution, its uncertainty and its draft for each item;
- ``calibration_requests``: the items a client asks the LLM about while learning its
  threshold (the escalated ones plus an exploration band below tau, minus those whose
  verdict it already has);
- ``query_tiers``: where each query goes under a threshold, peers tried first or not;
- ``score``: the answers (draft where local or confirmed by peers, the LLM's where
  escalated) against the labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedhlm_app.routing.p2p import ClassSums, Prototypes, resolve
from fedhlm_app.routing.threshold import exploration_mask
from fedhlm_app.slm.uncertainty import get_measure

LOCAL, OWN_CLUSTER, NEIGHBOUR, LLM = 0, 1, 2, 3


@dataclass(frozen=True)
class Routing:
    """For each item: the SLM distribution p, its uncertainty and its draft (argmax p)."""

    probs: np.ndarray  # (n, C)
    uncertainty: np.ndarray  # (n,)
    drafts: np.ndarray  # (n,)

    @staticmethod
    def of(probs: np.ndarray, measure: str) -> Routing:
        return Routing(probs, get_measure(measure)(probs), probs.argmax(axis=1))


def calibration_requests(uncertainty: np.ndarray, tau: float, band: float, known: np.ndarray) -> np.ndarray:
    """Ids of the calibration items to send for LLM feedback (those in ``known`` already have it)."""
    mask = exploration_mask(uncertainty, tau, band)
    mask[known] = False
    return np.flatnonzero(mask)


def peer_tiers(x: np.ndarray, drafts: np.ndarray, prototypes: Prototypes | None, delta: float, margin: float) -> np.ndarray:
    """Tier (1 own cluster, 2 neighbour, 3 LLM) of each uncertain item under peer consensus."""
    if prototypes is None:
        return np.full(len(drafts), LLM)
    return resolve(x, drafts, prototypes.own, prototypes.neighbours, delta, margin)


def query_tiers(routing: Routing, x: np.ndarray, tau: float, prototypes: Prototypes | None, try_peers: bool,
                delta: float, margin: float) -> np.ndarray:
    """Tier of each query: local at or below ``tau``; above it peers (when tried), else the LLM."""
    tiers = np.where(routing.uncertainty > tau, LLM, LOCAL)
    if try_peers:
        uncertain = np.flatnonzero(tiers == LLM)
        tiers[uncertain] = peer_tiers(x[uncertain], routing.drafts[uncertain], prototypes, delta, margin)
    return tiers


def score(tiers: np.ndarray, drafts: np.ndarray, answered_ids: np.ndarray, llm_final: np.ndarray, llm_accepted: np.ndarray,
          labels: np.ndarray) -> dict[str, int]:
    """Counts of the answers against the labels: local and peer answers keep the draft (peers confirm
    it), escalated items take the LLM's answer where it gave one, else keep the draft."""
    final = drafts.copy()
    final[answered_ids] = llm_final
    local, peer, escalated = tiers == LOCAL, (tiers == OWN_CLUSTER) | (tiers == NEIGHBOUR), tiers == LLM
    return {
        "num-examples": len(labels),
        "correct": int(np.sum(final == labels)),
        "escalated": int(np.sum(escalated)),
        "oracle-failed": int(np.sum(escalated) - len(answered_ids)),
        "accepted": int(np.sum(llm_accepted)),
        "local-correct": int(np.sum((final == labels) & local)),
        "slm-correct": int(np.sum(drafts == labels)),
        "p2p-own": int(np.sum(tiers == OWN_CLUSTER)),
        "p2p-neighbour": int(np.sum(tiers == NEIGHBOUR)),
        "p2p-wrong": int(np.sum(peer & (final != labels))),
    }


def resolved_class_sums(fit: Routing, fit_x: np.ndarray, calibration: Routing, calibration_x: np.ndarray, tau: float,
                        verified_ids: np.ndarray, verified_final: np.ndarray, num_classes: int) -> ClassSums:
    """Per-class sums of the embeddings a client resolved: confident answers (their draft) and
    LLM-verified calibration items (the LLM's class). Sums and counts leave the node, never the
    embeddings themselves."""
    labels = calibration.drafts.copy()
    labels[verified_ids] = verified_final
    resolved = calibration.uncertainty <= tau
    resolved[verified_ids] = True
    confident_fit = fit.uncertainty <= tau
    return (ClassSums.of(fit_x[confident_fit], fit.drafts[confident_fit], num_classes)
            + ClassSums.of(calibration_x[resolved], labels[resolved], num_classes))

"""The per-item routing a client runs: local answer, peers, or the LLM (pure numpy).

One implementation, used by the ClientApp (``fedhlm_app.app.node``) and by the evaluation
harness. Tiers index ``p2p.TIERS``: 0 local, 1 own cluster's peers, 2 a neighbour cluster's
peers, 3 the LLM.

- ``Routing.of``: the SLM's distribution, its uncertainty and its draft for each item;
- ``calibration_requests``: the items a client asks the LLM about while learning its
  threshold (the escalated ones plus an exploration band below tau, minus those whose
  verdict it already has);
- ``query_tiers``: where each query goes under a threshold, peers tried first or not;
- ``peer_evidence``: how peers would have done on the held-out items a client escalates;
- ``score``: the answers (draft where local or confirmed by peers, the LLM's where
  escalated) against the labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedhlm_app.routing.p2p import Prototypes, peer_scores, resolve
from fedhlm_app.routing.peer_bound import PeerEvidence
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


def peer_tiers(x: np.ndarray, drafts: np.ndarray, prototypes: Prototypes | None, thresholds: np.ndarray | None) -> np.ndarray:
    """Tier (1 own cluster, 2 neighbour, 3 LLM) of each uncertain item under the certified thresholds."""
    if prototypes is None or thresholds is None or len(thresholds) == 0:
        return np.full(len(drafts), LLM)
    return resolve(x, drafts, prototypes, thresholds)


def query_tiers(routing: Routing, x: np.ndarray, tau: float, prototypes: Prototypes | None,
                peer_thresholds: np.ndarray | None) -> np.ndarray:
    """Tier of each query: local at or below ``tau``; above it peers (where ``peer_thresholds``
    are given and certify the draft), else the LLM."""
    tiers = np.where(routing.uncertainty > tau, LLM, LOCAL)
    if peer_thresholds is not None:
        uncertain = np.flatnonzero(tiers == LLM)
        tiers[uncertain] = peer_tiers(x[uncertain], routing.drafts[uncertain], prototypes, peer_thresholds)
    return tiers


def peer_evidence(calibration: Routing, x: np.ndarray, tau: float, prototypes: Prototypes, verified_ids: np.ndarray,
                  verified_final: np.ndarray) -> PeerEvidence:
    """Peer scores and outcomes on the held-out items a client escalates under ``tau``: its
    calibration items above it with a known LLM verdict (a draft the LLM changed is a wrong peer answer)."""
    escalated = calibration.uncertainty[verified_ids] > tau
    ids, final = verified_ids[escalated], verified_final[escalated]
    drafts = calibration.drafts[ids]
    own, theirs = peer_scores(x[ids], drafts, prototypes)
    return PeerEvidence.of(np.maximum(own, theirs), drafts, final != drafts, calibration.uncertainty[ids], calibration.probs.shape[1])


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

"""The error bound on peer answers: a peer answer is accepted only where it is wrong with
probability at most epsilon (``p2p-max-error``), at 95% confidence, estimated out of sample (pure numpy).

A peer answer confirms the SLM's draft d of an uncertain item (``p2p.peer_scores``); its evidence is
the score s = cos(e, proto_d) - max_{k != d} cos(e, proto_k). Each client scores its held-out items,
the calibration items above its threshold whose LLM verdict it holds (prototypes are built from fit
items only, so none of these built them), and shares counts per draft class and score bin of the
items and of those whose draft the LLM rejected, and the same per share of their uncertainty
ranking (``PeerEvidence``). The edge adds them up per
cluster and certifies, per draft class, the lowest score threshold t whose items (s >= t) have a
one-sided 95% Wilson upper bound on their error of at most epsilon:

- thresholds are tested from the highest down and testing stops at the first that fails
  (fixed-sequence testing: the chance that any certified threshold's true error exceeds epsilon is
  at most 5%, where the normal approximation behind Wilson's bound holds);
- a threshold with too few items to pass even without errors is skipped. That depends on the
  scores alone, never on the errors, so it keeps the guarantee and lets testing start where there
  is data.

A class with no certified threshold never takes peer answers. Whether a cluster tries peers at all
is decided by two rules on the same held-out items:

- ``worth_trying`` prices false reuse against going straight to the LLM;
- ``beats_raising_threshold`` compares peers with the other way to save the same LLM calls: raising
  the threshold, which answers the least uncertain escalated items with the SLM's draft. Peers
  confirm the draft too, so they only help the accuracy / LLM-rate trade-off where the drafts they
  pick are wrong less often than those. Without this rule, a bound of 0.05 lowered the trade-off
  curve: near a threshold of 0 the least uncertain items are wrong far less than 5% of the time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Score bins: s below 0 (the draft is not the nearest class) is never certified; 0.01 steps up to 0.4,
# where AG News scores end (MiniLM embeddings, 4 classes); the last bin holds everything above.
SCORE_EDGES = np.round(np.linspace(0.0, 0.4, 41), 3)
NUM_BINS = len(SCORE_EDGES) + 1
Z_ONE_SIDED_95 = 1.6448536  # the upper end of a two-sided 90% interval is a one-sided 95% bound
NEVER = np.inf  # the threshold of a class without a certified region
RANK_BINS = 20  # equal shares of a client's escalated held-out items, least uncertain first


def wilson_interval(successes: float, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% two-sided by default; (0, 1) without trials)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def error_bound(wrong: int, items: int) -> float:
    """One-sided 95% upper confidence bound on an error rate (1 without items)."""
    return wilson_interval(wrong, items, Z_ONE_SIDED_95)[1]


def score_bins(scores: np.ndarray) -> np.ndarray:
    """Bin of each score: 0 below SCORE_EDGES[0], i for SCORE_EDGES[i-1] <= s < SCORE_EDGES[i]."""
    return np.searchsorted(SCORE_EDGES, scores, side="right")


def rank_bins(uncertainty: np.ndarray) -> np.ndarray:
    """Share of each item's uncertainty rank among ``uncertainty``, in RANK_BINS equal bins (0: least uncertain)."""
    ranks = np.argsort(np.argsort(uncertainty, kind="stable"), kind="stable")
    return ranks * RANK_BINS // max(len(uncertainty), 1)


@dataclass(frozen=True)
class PeerEvidence:
    """Held-out items per draft class and score bin, and how many of them the LLM rejected the draft
    of; and the same items by uncertainty rank (what raising the threshold would answer locally)."""

    items: np.ndarray  # (C, NUM_BINS)
    wrong: np.ndarray  # (C, NUM_BINS)
    rank_items: np.ndarray  # (RANK_BINS,)
    rank_wrong: np.ndarray  # (RANK_BINS,)

    @staticmethod
    def of(scores: np.ndarray, drafts: np.ndarray, wrong: np.ndarray, uncertainty: np.ndarray, num_classes: int) -> PeerEvidence:
        items, errors = np.zeros((num_classes, NUM_BINS), np.int64), np.zeros((num_classes, NUM_BINS), np.int64)
        wrong = np.asarray(wrong, dtype=np.int64)
        bins = score_bins(scores)
        np.add.at(items, (drafts, bins), 1)
        np.add.at(errors, (drafts, bins), wrong)
        ranks = rank_bins(uncertainty)
        return PeerEvidence(items, errors, np.bincount(ranks, minlength=RANK_BINS), np.bincount(ranks, wrong, RANK_BINS).astype(np.int64))

    def __add__(self, other: PeerEvidence) -> PeerEvidence:
        return PeerEvidence(self.items + other.items, self.wrong + other.wrong,
                            self.rank_items + other.rank_items, self.rank_wrong + other.rank_wrong)

    def certify(self, max_error: float) -> np.ndarray:
        """Per draft class, the lowest certified score threshold (``NEVER`` where none is)."""
        thresholds = np.full(len(self.items), NEVER)
        for d, (items, wrong) in enumerate(zip(self.items, self.wrong)):
            n, k = np.cumsum(items[::-1])[::-1], np.cumsum(wrong[::-1])[::-1]  # items with s >= the bin's lower edge
            for b in range(NUM_BINS - 1, 0, -1):  # bin 0 (s < 0) is never a candidate
                if error_bound(0, int(n[b])) > max_error:
                    continue  # too few items to pass even without errors: skipped, not failed
                if error_bound(int(k[b]), int(n[b])) > max_error:
                    break
                thresholds[d] = SCORE_EDGES[b - 1]
        return thresholds

    def accepted(self, thresholds: np.ndarray) -> tuple[int, int, int]:
        """(held-out items, how many peers would answer under ``thresholds``, how many of those wrongly)."""
        lower_edges = np.concatenate([[-np.inf], SCORE_EDGES])  # of each bin
        take = lower_edges[None, :] >= np.asarray(thresholds)[:, None]
        return int(self.items.sum()), int(self.items[take].sum()), int(self.wrong[take].sum())

    def wrong_if_threshold_raised(self, answered: int) -> float:
        """Wrong drafts among the ``answered`` least uncertain held-out items: what raising each
        client's threshold to answer that many more items locally would cost (interpolated within a bin)."""
        share = answered / max(int(self.rank_items.sum()), 1) * RANK_BINS  # in bins
        full = min(int(share), RANK_BINS)
        partial = float(self.rank_wrong[full]) * (share - full) if full < RANK_BINS else 0.0
        return float(self.rank_wrong[:full].sum()) + partial


@dataclass(frozen=True)
class PeerCosts:
    """Costs in the same unit (LLM calls when ``llm`` is 1): a peer attempt, an LLM call, a wrong peer answer."""

    p2p: float
    llm: float
    error: float


def worth_trying(evidence: PeerEvidence, thresholds: np.ndarray, costs: PeerCosts) -> bool:
    """Opportunistic rule that prices false reuse: try peers first only when

        c_p2p + (1 - h_correct) * c_llm + w * c_error < c_llm,

    with h_correct the share of uncertain items peers answer correctly (a wrong answer saves no LLM
    call: it is asked again) and w the share they answer wrongly, both bounded at 95% confidence
    on the held-out items (h_correct from below, w from above)."""
    items, accepted, wrong = evidence.accepted(thresholds)
    if accepted == 0:
        return False
    h_correct = wilson_interval(accepted - wrong, items, Z_ONE_SIDED_95)[0]
    w = error_bound(wrong, items)
    return costs.p2p + (1 - h_correct) * costs.llm + w * costs.error < costs.llm


def beats_raising_threshold(evidence: PeerEvidence, thresholds: np.ndarray) -> bool:
    """Whether peers answer the held-out items they take wrongly less often than raising the
    threshold would to save as many LLM calls, at 95% confidence each way: the upper bound on the
    peers' error rate must stay below the lower bound on the raised threshold's."""
    _, accepted, wrong = evidence.accepted(thresholds)
    if accepted == 0:
        return False
    raised_low = wilson_interval(evidence.wrong_if_threshold_raised(accepted), accepted, Z_ONE_SIDED_95)[0]
    return error_bound(wrong, accepted) < raised_low

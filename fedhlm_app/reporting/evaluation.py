"""Routing baselines and trade-off metrics, from per-item outcomes (pure numpy).

Every router is judged on the same test items by what it would escalate: an
item answered locally is correct when the SLM's draft is, an escalated item
when the LLM's answer is. The accuracy/LLM-rate curve of a router runs from
SLM-only (rate 0) to cloud-only (rate 1); these functions compare such curves.
"""

from __future__ import annotations

import numpy as np


def accuracy_at(escalate: np.ndarray, slm_correct: np.ndarray, llm_correct: np.ndarray) -> float:
    """Accuracy when exactly the items in the boolean mask ``escalate`` go to the LLM."""
    return float(np.mean(np.where(escalate, llm_correct, slm_correct)))


def threshold_curve(uncertainty: np.ndarray, slm_correct: np.ndarray, llm_correct: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """(LLM rate, accuracy) of the static rule 'escalate iff u > tau' for each tau; shape (len(taus), 2)."""
    return np.array([[np.mean(uncertainty > t), accuracy_at(uncertainty > t, slm_correct, llm_correct)] for t in taus])


def oracle_router(slm_correct: np.ndarray, llm_correct: np.ndarray, rate: float) -> np.ndarray:
    """The upper bound: escalate the items the SLM gets wrong and the LLM right, up to ``rate``.

    Remaining budget goes to items where escalation changes nothing (never to items the
    SLM gets right and the LLM wrong).
    """
    n = len(slm_correct)
    budget = int(round(rate * n))
    gain = llm_correct.astype(int) - slm_correct.astype(int)  # 1: helps, 0: neutral, -1: hurts
    order = np.lexsort((np.arange(n), -gain))  # helpful first, then neutral, then harmful
    escalate = np.zeros(n, dtype=bool)
    escalate[order[:budget]] = True
    return escalate


def random_router_accuracy(slm_correct: np.ndarray, llm_correct: np.ndarray, rate: float) -> float:
    """Expected accuracy of escalating a uniformly random ``rate`` share of items."""
    return float(np.mean(slm_correct) + rate * (np.mean(llm_correct) - np.mean(slm_correct)))


def uhlm_threshold(uncertainty: np.ndarray, beta: np.ndarray) -> tuple[float, float, float]:
    """U-HLM's rule: fit beta = a u + b by least squares; the risk-averse threshold is -b/a.

    Returns (threshold clipped to [0, 1], a, b).
    """
    a, b = np.polyfit(np.asarray(uncertainty, float), np.asarray(beta, float), 1)
    tau = -b / a if a > 0 else 1.0
    return float(np.clip(tau, 0.0, 1.0)), float(a), float(b)


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting half
    (the Mann-Whitney rank formula): how well ``score`` detects the ``positive`` items."""
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    _, first, counts = np.unique(np.asarray(score)[order], return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start:start + count]] = start + (count + 1) / 2.0  # tied scores share their mean rank
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / max(n_pos * n_neg, 1))


def _with_endpoints(curve: np.ndarray, slm_acc: float, cloud_acc: float) -> np.ndarray:
    pts = np.vstack([[0.0, slm_acc], np.asarray(curve, float).reshape(-1, 2), [1.0, cloud_acc]])
    pts = pts[np.argsort(pts[:, 0], kind="stable")]
    # keep, for each rate, the best accuracy reached at or below it (the router's frontier)
    pts[:, 1] = np.maximum.accumulate(pts[:, 1])
    return pts


def normalized_auc(curve: np.ndarray, slm_acc: float, cloud_acc: float) -> float:
    """Area between the accuracy/LLM-rate frontier and SLM-only, over the SLM-to-cloud gap.

    0.5 is a random router (a straight line), values near 1 recover the gap at tiny rates.
    """
    pts = _with_endpoints(curve, slm_acc, cloud_acc)
    gap = cloud_acc - slm_acc
    if gap <= 0:
        return 0.0
    area = float(np.sum(np.diff(pts[:, 0]) * (pts[1:, 1] + pts[:-1, 1]) / 2))
    return (area - slm_acc) / gap


def rate_to_recover(curve: np.ndarray, slm_acc: float, cloud_acc: float, fraction: float) -> float:
    """Smallest LLM rate whose accuracy recovers ``fraction`` of the SLM-to-cloud gap (interpolated)."""
    pts = _with_endpoints(curve, slm_acc, cloud_acc)
    target = slm_acc + fraction * (cloud_acc - slm_acc)
    for (r0, a0), (r1, a1) in zip(pts[:-1], pts[1:]):
        if a1 >= target:
            return float(r0 if a0 >= target or a1 == a0 else r0 + (target - a0) * (r1 - r0) / (a1 - a0))
    return 1.0

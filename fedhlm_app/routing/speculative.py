"""Speculative verification of an SLM draft by the LLM (U-HLM rule).

For a draft class d drawn from the SLM distribution p and the LLM distribution
q, the LLM accepts with probability min(1, q_d / p_d); on rejection it
resamples from norm(max(0, q - p)). The rejection probability
beta = max(0, 1 - q_d / p_d) is the feedback thresholds learn from. With a
one-hot q (an LLM that answers with a label) a wrong draft is always rejected
and the resample is the LLM's label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Verdict:
    """The LLM's answer for a batch of drafts."""

    beta: np.ndarray  # (n,) rejection probability of each draft
    accepted: np.ndarray  # (n,) bool
    final: np.ndarray  # (n,) final class: the draft if accepted, else the resample


def rejection_probability(p: np.ndarray, q: np.ndarray, draft: np.ndarray) -> np.ndarray:
    """beta = max(0, 1 - q_d / p_d) for each row."""
    rows = np.arange(len(draft))
    return rejection_of(np.asarray(p)[rows, draft], np.asarray(q)[rows, draft])


def rejection_of(p_d: np.ndarray, q_d: np.ndarray) -> np.ndarray:
    """beta = max(0, 1 - q_d / p_d) from the two probabilities of the drafts (1 where p_d is 0)."""
    p_d, q_d = np.asarray(p_d, dtype=np.float64), np.asarray(q_d, dtype=np.float64)
    ratio = np.divide(q_d, p_d, out=np.zeros_like(q_d), where=p_d > 0)
    return np.clip(1.0 - ratio, 0.0, 1.0)


def residual_distribution(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """norm(max(0, q - p)) per row; falls back to q where q == p (nothing to resample)."""
    res = np.maximum(np.asarray(q, dtype=np.float64) - np.asarray(p, dtype=np.float64), 0.0)
    mass = res.sum(axis=1, keepdims=True)
    return np.where(mass > 0, res / np.where(mass > 0, mass, 1.0), q)


def verify(p: np.ndarray, q: np.ndarray, draft: np.ndarray, rng: np.random.Generator) -> Verdict:
    """Accept or reject each draft and resample the rejected ones."""
    draft = np.asarray(draft, dtype=np.int64)
    beta = rejection_probability(p, q, draft)
    accepted = rng.random(len(draft)) >= beta
    final = draft.copy()
    residual = residual_distribution(p, q)
    for i in np.flatnonzero(~accepted):
        final[i] = rng.choice(residual.shape[1], p=residual[i])
    return Verdict(beta=beta, accepted=accepted, final=final)

"""Peer-to-peer resolution: reuse what the cluster already knows (pure numpy).

Each cluster keeps one *prototype* per class: the mean of the unit-normalised
SLM embeddings of items resolved in that cluster (confident local answers and
LLM-verified answers). Clients contribute per-class sums and counts, never
raw embeddings or texts; the edge adds them up (``ClassSums``), so the
prototype equals the mean over the pooled embeddings.

An uncertain item with draft class d is accepted by peer consensus when

    cos(e, proto_d) >= delta   and   cos(e, proto_d) - max_{k != d} cos(e, proto_k) >= margin,

first against its own cluster's prototypes, then (by scope) against
neighbouring clusters'; otherwise it goes to the LLM. Whether to try peers at
all is an opportunistic decision: with estimated peer-hit probability h and
costs c_p2p, c_llm, P2P pays off only when h > c_p2p / c_llm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TIERS = ("local", "p2p-own-cluster", "p2p-neighbour", "llm")
NEIGHBOUR_SCOPES = ("none", "all", "nearest")


@dataclass(frozen=True)
class ClassSums:
    """Per-class sums of unit embeddings and their counts: what a client shares."""

    sums: np.ndarray  # (C, D)
    counts: np.ndarray  # (C,)

    @staticmethod
    def of(unit_embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> ClassSums:
        onehot = np.eye(num_classes)[labels]  # (n, C): a matmul is far faster than np.add.at
        return ClassSums(onehot.T @ unit_embeddings, onehot.sum(axis=0))

    def __add__(self, other: ClassSums) -> ClassSums:
        return ClassSums(self.sums + other.sums, self.counts + other.counts)

    def prototypes(self) -> np.ndarray:
        """Mean embedding per class; a class nobody resolved gets a zero row (never matches)."""
        return self.sums / np.maximum(self.counts, 1.0)[:, None]


@dataclass(frozen=True)
class Prototypes:
    """What a client of a cluster holds (its token cache): its cluster's class prototypes and its neighbours'."""

    own: np.ndarray  # (C, D)
    neighbours: list[np.ndarray]

    def stacked(self) -> np.ndarray:
        return np.stack([self.own, *self.neighbours])


def prototypes_changed(old: np.ndarray | None, new: np.ndarray, tolerance: float = 2e-3) -> bool:
    """Whether prototypes moved enough to be worth sending again (cosines shift < tolerance)."""
    return old is None or old.shape != new.shape or bool(np.max(np.abs(old - new), initial=0.0) > tolerance)


def cosine_to_prototypes(unit_embeddings: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """cos(e, proto_k) for every item and class; zero where the prototype is empty."""
    norms = np.linalg.norm(prototypes, axis=1)
    return (unit_embeddings @ prototypes.T) / np.where(norms > 0, norms, np.inf)


def peer_accepts(unit_embeddings: np.ndarray, drafts: np.ndarray, prototypes: np.ndarray, delta: float, margin: float) -> np.ndarray:
    """Peer consensus on each draft: close to its class prototype and clearly closer than to any other."""
    if len(drafts) == 0:
        return np.zeros(0, dtype=bool)
    cos = cosine_to_prototypes(unit_embeddings, prototypes)
    rows = np.arange(len(drafts))
    own = cos[rows, drafts]
    others = cos.copy()
    others[rows, drafts] = -np.inf
    runner_up = others.max(axis=1) if cos.shape[1] > 1 else np.full(len(drafts), -np.inf)
    has_proto = np.linalg.norm(prototypes, axis=1)[drafts] > 0
    return has_proto & (own >= delta) & (own - runner_up >= margin)


def cluster_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine between matching class prototypes of two clusters (classes both have)."""
    ok = (np.linalg.norm(a, axis=1) > 0) & (np.linalg.norm(b, axis=1) > 0)
    if not ok.any():
        return -1.0
    cos = np.sum(a[ok] * b[ok], axis=1) / (np.linalg.norm(a[ok], axis=1) * np.linalg.norm(b[ok], axis=1))
    return float(cos.mean())


def neighbours(cluster: int, prototypes: dict[int, np.ndarray], scope: str, k: int) -> list[int]:
    """The clusters an item may try after its own: none, all, or the k most similar."""
    others = [c for c in sorted(prototypes) if c != cluster]
    if scope == "none" or cluster not in prototypes:
        return []
    if scope == "all":
        return others
    ranked = sorted(others, key=lambda c: -cluster_similarity(prototypes[cluster], prototypes[c]))
    return ranked[:k]


def resolve(
    unit_embeddings: np.ndarray,
    drafts: np.ndarray,
    own_prototypes: np.ndarray,
    neighbour_prototypes: list[np.ndarray],
    delta: float,
    margin: float,
) -> np.ndarray:
    """Tier per uncertain item: 1 own cluster, 2 a neighbour, 3 the LLM (indices into ``TIERS``)."""
    tier = np.full(len(drafts), 3)
    open_ = np.ones(len(drafts), dtype=bool)
    for level, protos in [(1, own_prototypes), *[(2, p) for p in neighbour_prototypes]]:
        idx = np.flatnonzero(open_)
        if len(idx) == 0:
            break
        hit = peer_accepts(unit_embeddings[idx], drafts[idx], protos, delta, margin)
        tier[idx[hit]] = level
        open_[idx[hit]] = False
    return tier


def worth_trying(hit_rate: float, cost_p2p: float, cost_llm: float) -> bool:
    """Opportunistic rule: try peers first only when h > c_p2p / c_llm."""
    return hit_rate > cost_p2p / cost_llm


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion ((0, 1) when there are no trials)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class HitStats:
    """P2P outcomes on a cluster's escalated calibration items (whose LLM verdict is known)."""

    attempts: int = 0
    hits: int = 0
    false_hits: int = 0

    def hit_rate(self) -> float:
        """Estimated peer-hit probability h, with a uniform prior (Laplace) for few attempts."""
        return (self.hits + 1) / (self.attempts + 2)


class PeerCoordinator:
    """The edge servers' P2P layer: per-cluster prototypes and hit statistics."""

    def __init__(self, scope: str, k: int, cost_p2p: float, cost_llm: float) -> None:
        self.scope, self.k = scope, k
        self.cost_p2p, self.cost_llm = cost_p2p, cost_llm
        self.sums: dict[int, ClassSums] = {}
        self.stats: dict[int, HitStats] = {}
        # Clients send their sums only when they changed, so the edge keeps the latest of each.
        self._latest: dict[int, tuple[int, ClassSums]] = {}
        self._views: dict[int, Prototypes | None] = {}  # per cluster, until the next refresh

    def refresh(self, contributions: dict[int, tuple[int, ClassSums]]) -> None:
        """Take clients' new sums ({node: (cluster, sums)}) and rebuild each cluster's total.

        Hit statistics are reset too: they describe the prototypes and thresholds of the
        round just measured, which the next ``record`` calls report.
        """
        self.stats = {}
        self._latest.update(contributions)
        totals: dict[int, ClassSums] = {}
        for cluster, sums in self._latest.values():
            totals[cluster] = totals[cluster] + sums if cluster in totals else sums
        self.sums = totals
        self._views = {}

    def rename_nodes(self, new_id: dict[int, int]) -> None:
        """Carry the clients' latest sums over to their node ids in a resumed run (others are dropped)."""
        self._latest = {new_id[node]: sums for node, sums in self._latest.items() if node in new_id}

    def prototypes(self) -> dict[int, np.ndarray]:
        return {c: s.prototypes() for c, s in sorted(self.sums.items())}

    def view(self, cluster: int) -> Prototypes | None:
        """What a client of ``cluster`` receives: its prototypes and its neighbours' (computed once per refresh)."""
        if cluster not in self._views:
            protos = self.prototypes()
            self._views[cluster] = (
                Prototypes(protos[cluster], [protos[c] for c in neighbours(cluster, protos, self.scope, self.k)])
                if cluster in protos else None
            )
        return self._views[cluster]

    def record(self, cluster: int, attempts: int, hits: int, false_hits: int) -> None:
        stats = self.stats.setdefault(cluster, HitStats())
        stats.attempts += attempts
        stats.hits += hits
        stats.false_hits += false_hits

    def enabled(self, cluster: int) -> bool:
        """Opportunistic collaboration: is trying peers first worth it for this cluster?"""
        return worth_trying(self.stats.get(cluster, HitStats()).hit_rate(), self.cost_p2p, self.cost_llm)

"""Peer-to-peer resolution: reuse what the cluster already knows (pure numpy).

Each cluster keeps one *prototype* per class: the mean of the unit-normalised SLM embeddings
of its clients' labelled fit items. Clients contribute per-class sums and counts, never raw
embeddings or texts; the edge adds them up (``ClassSums``), so the prototype equals the mean over
the pooled embeddings. Calibration items never enter them, so the error of peer answers can be
estimated on those items out of sample (``peer_bound``).

A peer answer confirms the draft d of an uncertain item. Its evidence is the score

    s = cos(e, proto_d) - max_{k != d} cos(e, proto_k),

first against the own cluster's prototypes, then (by scope) the neighbouring clusters'; the
item is answered by peers where s reaches the threshold the edge certified for class d
(``peer_bound.PeerEvidence.certify``), otherwise it goes to the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedhlm_app.routing.peer_bound import NEVER, PeerCosts, PeerEvidence, beats_raising_threshold, worth_trying

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
        """Mean embedding per class; a class without fit items in the cluster gets a zero row (never matches)."""
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


def margin_scores(unit_embeddings: np.ndarray, drafts: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """How much closer each item is to its draft class's prototype than to any other class's
    (-inf where the draft class has no prototype: nobody can confirm it)."""
    if len(drafts) == 0:
        return np.zeros(0)
    cos = cosine_to_prototypes(unit_embeddings, prototypes)
    rows = np.arange(len(drafts))
    own = cos[rows, drafts]
    cos[rows, drafts] = -np.inf
    runner_up = cos.max(axis=1) if cos.shape[1] > 1 else np.full(len(drafts), -np.inf)
    has_proto = np.linalg.norm(prototypes, axis=1)[drafts] > 0
    return np.where(has_proto, own - runner_up, -np.inf)


def peer_scores(unit_embeddings: np.ndarray, drafts: np.ndarray, prototypes: Prototypes) -> tuple[np.ndarray, np.ndarray]:
    """Each draft's score against the own cluster's prototypes and the best against a neighbour's."""
    own = margin_scores(unit_embeddings, drafts, prototypes.own)
    theirs = [margin_scores(unit_embeddings, drafts, p) for p in prototypes.neighbours]
    return own, np.max(theirs, axis=0) if theirs else np.full(len(drafts), -np.inf)


def resolve(unit_embeddings: np.ndarray, drafts: np.ndarray, prototypes: Prototypes, thresholds: np.ndarray) -> np.ndarray:
    """Tier per uncertain item: 1 own cluster, 2 a neighbour, 3 the LLM (indices into ``TIERS``),
    peers answering where a score reaches the certified threshold of the item's draft class."""
    own, theirs = peer_scores(unit_embeddings, drafts, prototypes)
    bar = np.asarray(thresholds)[drafts] if len(drafts) else np.zeros(0)
    return np.where(own >= bar, 1, np.where(theirs >= bar, 2, 3))


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


class PeerCoordinator:
    """The edge servers' P2P layer: per-cluster prototypes, held-out evidence and certified thresholds."""

    def __init__(self, scope: str, k: int, max_error: float, costs: PeerCosts, beat_threshold: bool = True) -> None:
        self.scope, self.k = scope, k
        self.max_error, self.costs, self.beat_threshold = max_error, costs, beat_threshold
        self.sums: dict[int, ClassSums] = {}
        self.evidence: dict[int, PeerEvidence] = {}
        self.thresholds: dict[int, np.ndarray] = {}
        # Clients send their sums only when they changed, so the edge keeps the latest of each.
        self._latest: dict[int, tuple[int, ClassSums]] = {}
        self._views: dict[int, Prototypes | None] = {}  # per cluster, until the next refresh

    def refresh(self, contributions: dict[int, tuple[int, ClassSums]]) -> None:
        """Take clients' new sums ({node: (cluster, sums)}) and rebuild each cluster's total."""
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

    def certify(self, contributions: dict[int, tuple[int, PeerEvidence]]) -> None:
        """Add up clients' held-out evidence ({node: (cluster, evidence)}) per cluster and certify its thresholds."""
        totals: dict[int, PeerEvidence] = {}
        for cluster, evidence in contributions.values():
            totals[cluster] = totals[cluster] + evidence if cluster in totals else evidence
        self.evidence = totals
        self.thresholds = {c: e.certify(self.max_error) for c, e in sorted(totals.items())}

    def enabled(self, cluster: int) -> bool:
        """Opportunistic collaboration: do peers pay for this cluster, false reuse priced in, and (with
        ``beat_threshold``) do they answer better than raising the threshold would?"""
        if cluster not in self.evidence:
            return False
        evidence, thresholds = self.evidence[cluster], self.thresholds[cluster]
        return worth_trying(evidence, thresholds, self.costs) and (not self.beat_threshold or beats_raising_threshold(evidence, thresholds))

    def thresholds_of(self, cluster: int) -> np.ndarray:
        return self.thresholds.get(cluster, np.full(0, NEVER))

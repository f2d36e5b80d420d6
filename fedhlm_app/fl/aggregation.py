"""Hierarchical aggregation in numpy: edge (per cluster), then cloud.

An update is a client's parameters (a list of arrays), its cluster and its
weight (sample count). A *rule* reduces weighted parameter lists to one list.
``hierarchical`` applies the edge rule inside each cluster (edge weight =
sum of its clients' weights), then the cloud rule across the edge results;
``flat`` applies one rule to all clients, like plain FedAvg. With weighted
means both give the same global model, but only the hierarchical one yields
the per-cluster (edge) models used for personalization and reporting.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Params = list[np.ndarray]
Rule = Callable[[Sequence[Params], Sequence[float]], Params]


@dataclass(frozen=True)
class Update:
    """One client's contribution to a round."""

    params: Params
    cluster: int
    weight: float


@dataclass(frozen=True)
class Aggregate:
    """A round's result: the global parameters (None after an edge-only round) and each cluster's."""

    global_params: Params | None
    cluster_params: dict[int, Params]
    cluster_weights: dict[int, float]


def weighted_mean(params: Sequence[Params], weights: Sequence[float]) -> Params:
    """sum_i w_i x_i / sum_i w_i, layer by layer."""
    w = np.asarray(weights, dtype=np.float64)
    if len(params) == 0 or w.sum() <= 0:
        raise ValueError("weighted_mean needs at least one update with positive weight")
    w = w / w.sum()
    return [sum(wi * np.asarray(p[layer], dtype=np.float64) for wi, p in zip(w, params)) for layer in range(len(params[0]))]


def _by_cluster(updates: Sequence[Update]) -> dict[int, list[Update]]:
    """Updates grouped by cluster; zero-weight updates (clients without data) carry nothing."""
    groups: dict[int, list[Update]] = defaultdict(list)
    for u in updates:
        if u.weight > 0:
            groups[u.cluster].append(u)
    return dict(sorted(groups.items()))


def edges(updates: Sequence[Update], edge_rule: Rule = weighted_mean) -> Aggregate:
    """Edge aggregation per cluster only (an edge round: no global model)."""
    cluster_params, cluster_weights = {}, {}
    for cluster, members in _by_cluster(updates).items():
        cluster_params[cluster] = edge_rule([u.params for u in members], [u.weight for u in members])
        cluster_weights[cluster] = float(sum(u.weight for u in members))
    return Aggregate(None, cluster_params, cluster_weights)


def hierarchical(updates: Sequence[Update], edge_rule: Rule = weighted_mean, cloud_rule: Rule = weighted_mean) -> Aggregate:
    """Edge aggregation per cluster, then cloud aggregation over clusters."""
    edge = edges(updates, edge_rule)
    clusters = list(edge.cluster_params)
    global_params = cloud_rule([edge.cluster_params[c] for c in clusters], [edge.cluster_weights[c] for c in clusters])
    return Aggregate(global_params, edge.cluster_params, edge.cluster_weights)


def flat(updates: Sequence[Update], rule: Rule = weighted_mean) -> Aggregate:
    """One rule over all clients; every cluster then holds the global model."""
    global_params = rule([u.params for u in updates], [u.weight for u in updates])
    groups = _by_cluster(updates)
    return Aggregate(
        global_params,
        {c: global_params for c in groups},
        {c: float(sum(u.weight for u in m)) for c, m in groups.items()},
    )


class ServerAdam:
    """A FedAdam-style cloud rule (Reddi et al., 2021, "Adaptive Federated Optimization").

    The weighted mean of the edge results is the target; the cloud model moves toward it with
    Adam on the pseudo-gradient (target - model): m = b1 m + (1 - b1) d, v = b2 v + (1 - b2) d^2,
    model += lr m / (sqrt(v) + eps), as Flower's ``FedAdam``. The first aggregation of a model
    starts it at the target. State is kept per model, told apart by its array shapes: one strategy
    aggregates the SLM head, then the thresholds.
    """

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, eps: float = 1e-9) -> None:
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.state: dict[tuple, tuple[Params, Params, Params]] = {}  # shapes -> (model, m, v)

    def __call__(self, params: Sequence[Params], weights: Sequence[float]) -> Params:
        target = weighted_mean(params, weights)
        key = tuple(np.shape(layer) for layer in target)
        if key not in self.state:
            self.state[key] = (target, [np.zeros_like(t) for t in target], [np.zeros_like(t) for t in target])
            return target
        model, m, v = self.state[key]
        delta = [t - x for t, x in zip(target, model)]
        m = [self.beta1 * mi + (1 - self.beta1) * d for mi, d in zip(m, delta)]
        v = [self.beta2 * vi + (1 - self.beta2) * d * d for vi, d in zip(v, delta)]
        model = [x + self.lr * mi / (np.sqrt(vi) + self.eps) for x, mi, vi in zip(model, m, v)]
        self.state[key] = (model, m, v)
        return model

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
    """A round's result: the global parameters and each cluster's edge parameters."""

    global_params: Params
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


def hierarchical(updates: Sequence[Update], edge_rule: Rule = weighted_mean, cloud_rule: Rule = weighted_mean) -> Aggregate:
    """Edge aggregation per cluster, then cloud aggregation over clusters."""
    cluster_params, cluster_weights = {}, {}
    for cluster, members in _by_cluster(updates).items():
        cluster_params[cluster] = edge_rule([u.params for u in members], [u.weight for u in members])
        cluster_weights[cluster] = float(sum(u.weight for u in members))
    clusters = list(cluster_params)
    global_params = cloud_rule([cluster_params[c] for c in clusters], [cluster_weights[c] for c in clusters])
    return Aggregate(global_params, cluster_params, cluster_weights)


def flat(updates: Sequence[Update], rule: Rule = weighted_mean) -> Aggregate:
    """One rule over all clients; every cluster then holds the global model."""
    global_params = rule([u.params for u in updates], [u.weight for u in updates])
    groups = _by_cluster(updates)
    return Aggregate(
        global_params,
        {c: global_params for c in groups},
        {c: float(sum(u.weight for u in m)) for c, m in groups.items()},
    )

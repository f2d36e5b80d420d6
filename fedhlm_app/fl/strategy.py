"""The aggregator the training phases call: checks client updates, then aggregates them edge, then cloud.

FedHLM's ServerApp drives its own phases (encoder, head, threshold rounds), so it does not
run Flower's ``Strategy.start`` loop; each round it hands the decoded client updates to a
``HierarchicalAggregator``, which checks them (``UpdateSpec``), groups them by cluster,
reduces each cluster with the edge rule and the edge results with the cloud rule
(``fedhlm_app.fl.aggregation``), and returns what it aggregated as a value: the global
model (after a cloud round) and every cluster's.

Strategies are chosen by name from the run config (``STRATEGIES``; presets in
``conf/strategies/``). The robust edge rules are Flower's own (``aggregate_median``,
``aggregate_trimmed_avg``, as in ``FedMedian`` and ``FedTrimmedAvg``): they ignore sample
counts inside a cluster, and the cloud still weighs each cluster by its samples.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.common import log
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

from fedhlm_app.fl.aggregation import Aggregate, Params, Rule, ServerAdam, Update, edges, flat, hierarchical, weighted_mean
from fedhlm_app.fl.updates import UpdateSpec

if TYPE_CHECKING:
    from fedhlm_app.config import RunConfig

WEIGHT_KEY = "num-examples"


@dataclass(frozen=True)
class NodeUpdate:
    """One node's decoded reply to a training round (or why it could not be decoded)."""

    node: int
    params: Params
    metrics: dict[str, Any]
    problem: str | None = None  # set when the reply was malformed


@dataclass(frozen=True)
class RoundResult:
    """What a round aggregated: ``aggregate.global_params`` is None after an edge-only round."""

    aggregate: Aggregate
    metrics: dict[str, float]  # example-weighted means of the clients' metrics, and their total examples

    @property
    def is_cloud_round(self) -> bool:
        return self.aggregate.global_params is not None


def weighted_metrics(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """Example-weighted mean of every numeric metric the replies share, plus the total example count."""
    weights = np.array([float(m[WEIGHT_KEY]) for m in metrics])
    total = float(weights.sum())
    out: dict[str, float] = {WEIGHT_KEY: total}
    keys = set.intersection(*(set(m) for m in metrics)) - {WEIGHT_KEY}
    for key in sorted(keys):
        values = [m[key] for m in metrics]
        if all(isinstance(v, (int, float)) for v in values) and total > 0:
            out[key] = float(np.dot(weights, values) / total)
    return out


class HierarchicalAggregator:
    """Edge-then-cloud (or flat) aggregation of any arrays (encoder layers, head weights, thresholds)."""

    def __init__(self, name: str, cluster_of: dict[int, int], is_hierarchical: bool = True, edge_rule: Rule = weighted_mean,
                 cloud_rule: Rule = weighted_mean, min_cluster_updates: int = 1) -> None:
        self.name = name
        self.cluster_of = dict(cluster_of)
        self.is_hierarchical = is_hierarchical
        self.edge_rule = edge_rule
        self.cloud_rule = cloud_rule
        self.min_cluster_updates = min_cluster_updates  # fewer valid updates: the cluster sits the round out
        self.rejected: list[dict] = []  # updates dropped before aggregation: what, round, node, reason

    def state(self) -> dict:
        """What a checkpoint needs to resume: the rejections and the cloud rule (Adam keeps state)."""
        return {"rejected": self.rejected, "cloud_rule": self.cloud_rule}

    def load_state(self, state: dict) -> None:
        self.rejected[:0] = state["rejected"]
        self.cloud_rule = state["cloud_rule"]

    def summary(self) -> None:
        kind = "hierarchical (edge, then cloud)" if self.is_hierarchical else "flat"
        log(INFO, "aggregation: %s '%s' over %d nodes in %d clusters", kind, self.name, len(self.cluster_of),
            len(set(self.cluster_of.values())))

    def aggregate(self, server_round: int, updates: list[NodeUpdate], spec: UpdateSpec, cloud: bool = True) -> RoundResult | None:
        """Aggregate a round; ``cloud=False`` stops at the edge. None when no valid update is left.

        Updates that are malformed or do not fit ``spec`` (shape, type, range, finiteness) are
        dropped before aggregation, logged and kept in ``rejected``.
        """
        valid = [(u, Update(u.params, self.cluster_of[u.node], float(u.metrics[WEIGHT_KEY])))
                 for u in updates if self._accepted(server_round, u, spec)]
        if self.is_hierarchical:
            valid = self._without_thin_clusters(server_round, valid)
        if not valid:
            return None
        clients = [update for _, update in valid]
        if not self.is_hierarchical:
            result = flat(clients, self.cloud_rule)
        elif cloud:
            result = hierarchical(clients, self.edge_rule, self.cloud_rule)
        else:
            result = edges(clients, self.edge_rule)
        return RoundResult(result, weighted_metrics([u.metrics for u, _ in valid]))

    def _accepted(self, server_round: int, update: NodeUpdate, spec: UpdateSpec) -> bool:
        if update.node not in self.cluster_of:
            log(WARNING, "round %d: reply from unknown node %s ignored", server_round, update.node)
            return False
        problem = update.problem or spec.problem(update.params, update.metrics.get(WEIGHT_KEY), update.metrics)
        if problem is None:
            return True
        log(WARNING, "round %d: %s update from node %s rejected: %s", server_round, spec.name, update.node, problem)
        self.rejected.append({"what": spec.name, "round": server_round, "node": update.node, "reason": problem})
        return False

    def _without_thin_clusters(self, server_round: int, valid: list[tuple[NodeUpdate, Update]]) -> list[tuple[NodeUpdate, Update]]:
        """Drop clusters with fewer than ``min_cluster_updates`` valid updates (they keep their last aggregate)."""
        counts = Counter(u.cluster for _, u in valid)
        thin = sorted(c for c, n in counts.items() if n < self.min_cluster_updates)
        if thin:
            log(WARNING, "round %d: clusters %s have fewer than %d valid updates and keep their previous aggregate",
                server_round, thin, self.min_cluster_updates)
        return [(n, u) for n, u in valid if u.cluster not in thin]


def flower_median(params: list[Params], weights: list[float]) -> Params:
    """Coordinate-wise median, Flower's ``FedMedian`` rule (sample counts ignored, as there)."""
    return aggregate_median([(p, int(w)) for p, w in zip(params, weights)])


def flower_trimmed_mean(fraction: float) -> Rule:
    """Coordinate-wise mean without the ``fraction`` lowest and highest values, Flower's ``FedTrimmedAvg`` rule."""

    def rule(params: list[Params], weights: list[float]) -> Params:
        return aggregate_trimmed_avg([(p, int(w)) for p, w in zip(params, weights)], proportiontocut=fraction)

    return rule


AggregatorFactory = Callable[[str, dict[int, int], "RunConfig"], HierarchicalAggregator]
STRATEGIES: dict[str, AggregatorFactory] = {
    "hierarchical-fedavg": lambda name, cluster_of, cfg: HierarchicalAggregator(name, cluster_of),
    "fedavg": lambda name, cluster_of, cfg: HierarchicalAggregator(name, cluster_of, is_hierarchical=False),
    "hierarchical-median": lambda name, cluster_of, cfg: HierarchicalAggregator(name, cluster_of, edge_rule=flower_median),
    "hierarchical-trimmed-mean": lambda name, cluster_of, cfg: HierarchicalAggregator(
        name, cluster_of, edge_rule=flower_trimmed_mean(cfg.trim_fraction)
    ),
    "hierarchical-fedadam": lambda name, cluster_of, cfg: HierarchicalAggregator(name, cluster_of, cloud_rule=ServerAdam(lr=cfg.server_lr)),
}


def make_aggregator(cfg: RunConfig, cluster_of: dict[int, int]) -> HierarchicalAggregator:
    """The aggregator the run config names (``strategy``; the config has checked the name)."""
    aggregator = STRATEGIES[cfg.strategy](cfg.strategy, cluster_of, cfg)
    aggregator.min_cluster_updates = cfg.min_cluster_clients  # honoured by every strategy
    return aggregator

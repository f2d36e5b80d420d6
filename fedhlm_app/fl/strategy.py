"""Hierarchical aggregation as a Flower ``Strategy`` (edge per cluster, then cloud).

Flower is hub-and-spoke, so the edge servers are a logical layer: replies are
grouped by the cluster of the node that sent them (learned in the setup
phase), reduced per cluster with the edge rule, and the edge results reduced
with the cloud rule (``fedhlm_app.fl.aggregation``). ``flat`` FedAvg ignores the
clusters. Strategies are chosen by name from the run config (``STRATEGIES``;
presets in ``conf/strategies/``). The robust edge rules are Flower's own
(``aggregate_median``, ``aggregate_trimmed_avg``, as in ``FedMedian`` and
``FedTrimmedAvg``): they ignore sample counts inside a cluster, and the cloud
still weighs each cluster by its samples.

The ServerApp drives its own phases (head, threshold, inference) and calls
``aggregate_train`` for each; ``configure_*`` keep the standard
``Strategy.start`` loop usable too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedhlm_app.fl.aggregation import Aggregate, Rule, ServerAdam, Update, edges, flat, hierarchical, weighted_mean
from fedhlm_app.app.protocol import arrays_record, record_arrays
from fedhlm_app.fl.updates import UpdateSpec

WEIGHT_KEY = "num-examples"


def _weighted_metrics(replies: list[Message]) -> MetricRecord:
    """Example-weighted mean of every numeric metric, plus the total example count."""
    weights = np.array([float(m.content["metrics"][WEIGHT_KEY]) for m in replies])
    total = float(weights.sum())
    out: dict[str, float] = {WEIGHT_KEY: total}
    keys = set.intersection(*(set(m.content["metrics"]) for m in replies)) - {WEIGHT_KEY}
    for key in sorted(keys):
        values = [m.content["metrics"][key] for m in replies]
        if all(isinstance(v, (int, float)) for v in values) and total > 0:
            out[key] = float(np.dot(weights, values) / total)
    return MetricRecord(out)


class HierarchicalStrategy(Strategy):
    """Edge-then-cloud aggregation of any arrays (head weights, thresholds)."""

    def __init__(
        self,
        cluster_of: dict[int, int],
        is_hierarchical: bool = True,
        edge_rule: Rule = weighted_mean,
        cloud_rule: Rule = weighted_mean,
        min_cluster_updates: int = 1,
    ) -> None:
        self.cluster_of = dict(cluster_of)
        self.min_cluster_updates = min_cluster_updates  # fewer valid updates: the cluster sits the round out
        self.is_hierarchical = is_hierarchical
        self.edge_rule = edge_rule
        self.cloud_rule = cloud_rule
        self.last: Aggregate | None = None
        self.rejected: list[dict] = []  # updates dropped before aggregation: what, round, node, reason

    def state(self) -> dict:
        """What a checkpoint needs to resume this strategy: its rejections and the cloud rule (Adam keeps state)."""
        return {"rejected": self.rejected, "cloud_rule": self.cloud_rule}

    def load_state(self, state: dict) -> None:
        self.rejected[:0] = state["rejected"]
        self.cloud_rule = state["cloud_rule"]

    def summary(self) -> None:
        kind = "hierarchical (edge, then cloud)" if self.is_hierarchical else "flat"
        log(INFO, "\t├──> %s aggregation over %d nodes in %d clusters", kind, len(self.cluster_of), len(set(self.cluster_of.values())))

    def _broadcast(self, message_type: str, arrays: ArrayRecord, config: ConfigRecord) -> list[Message]:
        content = RecordDict({"arrays": arrays, "config": config})
        return [Message(content, dst_node_id=node, message_type=message_type) for node in self.cluster_of]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config["server-round"] = server_round
        return self._broadcast("train", arrays, config)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message], cloud: bool = True, spec: UpdateSpec | None = None
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate a round; ``cloud=False`` stops at the edge (arrays None, ``last.cluster_params`` set).

        With ``spec``, updates that do not fit it (shape, type, range, finiteness) are
        dropped before aggregation, logged and kept in ``rejected``.
        """
        ok, updates = [], []
        for m in replies:
            node = m.metadata.src_node_id
            if m.has_error():
                log(WARNING, "round %d: node %s failed: %s", server_round, node, m.error.reason)
            elif node not in self.cluster_of:
                log(WARNING, "round %d: reply from unknown node %s ignored", server_round, node)
            elif (update := self._update(server_round, m, spec)) is not None:
                ok.append(m)
                updates.append(update)
        if self.is_hierarchical:
            ok, updates = self._without_thin_clusters(server_round, ok, updates)
        if not ok:
            return None, None
        if not self.is_hierarchical:
            self.last = flat(updates, self.cloud_rule)
        elif cloud:
            self.last = hierarchical(updates, self.edge_rule, self.cloud_rule)
        else:
            self.last = edges(updates, self.edge_rule)
        arrays = arrays_record(self.last.global_params) if self.last.global_params is not None else None
        return arrays, _weighted_metrics(ok)

    def _without_thin_clusters(self, server_round: int, ok: list[Message], updates: list[Update]):
        """Drop clusters with fewer than ``min_cluster_updates`` valid updates (they keep their last aggregate)."""
        counts = Counter(u.cluster for u in updates)
        thin = sorted(c for c, n in counts.items() if n < self.min_cluster_updates)
        if not thin:
            return ok, updates
        log(WARNING, "round %d: clusters %s have fewer than %d valid updates and keep their previous aggregate",
            server_round, thin, self.min_cluster_updates)
        keep = [i for i, u in enumerate(updates) if u.cluster not in thin]
        return [ok[i] for i in keep], [updates[i] for i in keep]

    def _update(self, server_round: int, reply: Message, spec: UpdateSpec | None) -> Update | None:
        """The reply as an ``Update``, or None (logged, recorded) when it is malformed or invalid."""
        node = reply.metadata.src_node_id
        try:
            params = record_arrays(reply.content["arrays"])
            metrics = dict(reply.content["metrics"])
            weight = metrics[WEIGHT_KEY]
        except Exception as exc:  # noqa: BLE001 - any decoding failure means a malformed reply
            problem = f"malformed reply ({type(exc).__name__}: {exc})"
        else:
            problem = spec.problem(params, weight, metrics) if spec is not None else None
        if problem is None:
            return Update(params, self.cluster_of[node], float(weight))
        what = spec.name if spec is not None else "update"
        log(WARNING, "round %d: %s update from node %s rejected: %s", server_round, what, node, problem)
        self.rejected.append({"what": what, "round": server_round, "node": node, "reason": problem})
        return None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config["server-round"] = server_round
        return self._broadcast("evaluate", arrays, config)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        ok = [m for m in replies if not m.has_error()]
        return _weighted_metrics(ok) if ok else None


def flower_median(params: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    """Coordinate-wise median, Flower's ``FedMedian`` rule (sample counts ignored, as there)."""
    return aggregate_median([(p, int(w)) for p, w in zip(params, weights)])


def flower_trimmed_mean(fraction: float) -> Rule:
    """Coordinate-wise mean without the ``fraction`` lowest and highest values, Flower's ``FedTrimmedAvg`` rule."""

    def rule(params: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
        return aggregate_trimmed_avg([(p, int(w)) for p, w in zip(params, weights)], proportiontocut=fraction)

    return rule


StrategyFactory = Callable[[dict[int, int], dict], HierarchicalStrategy]
STRATEGIES: dict[str, StrategyFactory] = {
    "hierarchical-fedavg": lambda cluster_of, cfg: HierarchicalStrategy(cluster_of, is_hierarchical=True),
    "fedavg": lambda cluster_of, cfg: HierarchicalStrategy(cluster_of, is_hierarchical=False),
    "hierarchical-median": lambda cluster_of, cfg: HierarchicalStrategy(cluster_of, edge_rule=flower_median),
    "hierarchical-trimmed-mean": lambda cluster_of, cfg: HierarchicalStrategy(
        cluster_of, edge_rule=flower_trimmed_mean(cfg["trim-fraction"])
    ),
    "hierarchical-fedadam": lambda cluster_of, cfg: HierarchicalStrategy(cluster_of, cloud_rule=ServerAdam(lr=cfg["server-lr"])),
}


def make_strategy(cfg: dict, cluster_of: dict[int, int]) -> HierarchicalStrategy:
    """The strategy the run config names (``strategy``)."""
    try:
        factory = STRATEGIES[cfg["strategy"]]
    except KeyError:
        raise ValueError(f"unknown strategy '{cfg['strategy']}' (known: {sorted(STRATEGIES)})") from None
    strategy = factory(cluster_of, cfg)
    strategy.min_cluster_updates = cfg.get("min-cluster-clients", 1)  # honoured by every strategy
    return strategy

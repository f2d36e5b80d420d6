"""Edge-then-cloud aggregation with Flower strategies: what the training phases call each round.

FedHLM's ServerApp drives its own phases (encoder, head, threshold rounds), so it does not run
Flower's ``Strategy.start`` loop. Each round it asks the ``TieredAggregator`` for the round's
client config (``configure``: each tier's strategy runs its ``configure_train`` on the model the
round starts from, which is how stateful strategies such as FedAdam or FedAvgM learn it and how
FedProx's ``proximal-mu`` reaches the clients), then hands it the decoded replies
(``aggregate``): they are checked (``UpdateSpec``), grouped by cluster, reduced per cluster by
the edge strategy's own ``aggregate_train``, and the edge results, weighted by their clusters'
examples, by the cloud strategy's ``aggregate_train``. Without an edge tier the cloud strategy
reduces every client's reply, so a flat run's numbers are Flower's exactly.

Every aggregated model (encoder layers, head, thresholds) has its own strategy instances: one
per cluster at the edge and one at the cloud, so a server optimizer's moments belong to one
model. They are plain objects and travel in the checkpoint (``state``).
"""

from __future__ import annotations

import gc
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp.strategy import Strategy

from fedhlm_app.config import ConfigError, RunConfig
from fedhlm_app.fl.records import arrays_record, record_arrays
from fedhlm_app.fl.strategies import NO_EDGE, StrategyError, StrategyFactory, factory
from fedhlm_app.fl.updates import UpdateSpec

Params = list[np.ndarray]
WEIGHT_KEY = "num-examples"
LOSS_KEY = "train_loss"  # the loss a strategy reads (QFedAvg's default ``train_loss_key``)


@dataclass(frozen=True)
class NodeUpdate:
    """One node's decoded reply to a training round (or why it could not be decoded)."""

    node: int
    params: Params
    metrics: dict[str, Any]
    problem: str | None = None  # set when the reply was malformed


@dataclass(frozen=True)
class Aggregate:
    """A round's result: the global parameters (None after an edge-only round) and each cluster's."""

    global_params: Params | None
    cluster_params: dict[int, Params]
    cluster_weights: dict[int, float]


@dataclass(frozen=True)
class RoundResult:
    """What a round aggregated, and the example-weighted means of the clients' metrics."""

    aggregate: Aggregate
    metrics: dict[str, float]

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
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and total > 0:
            out[key] = float(np.dot(weights, values) / total)
    return out


def as_reply(member: int, params: Params, metrics: dict[str, Any]) -> Message:
    """A training reply as Flower's strategies read one: one ArrayRecord, one MetricRecord with the weight."""
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    loss = numbers.get("train-loss", numbers.get("loss"))
    if loss is not None:
        numbers.setdefault(LOSS_KEY, loss)
    content = RecordDict({"arrays": arrays_record(params), "metrics": MetricRecord(numbers)})
    return Message(content, dst_node_id=member, message_type="train")


class TierMembers:
    """What a strategy's ``configure_train`` sees of its tier: the members it may sample. FedHLM asks
    every client to train, so whom the strategy samples is not used."""

    def __init__(self, members: list[int]) -> None:
        self.members = members

    def get_node_ids(self) -> list[int]:
        return list(self.members)


@contextmanager
def _quiet_strategy() -> Iterator[None]:
    """Flower's strategies log every call at INFO ("configure_train: Sampled 2 nodes", "aggregate_train:
    Received 2 results"): here one line per cluster, model and round, about a sampling that does not
    happen. Their warnings still show."""
    level = FLOWER_LOGGER.level
    FLOWER_LOGGER.setLevel(max(level, WARNING))
    try:
        yield
    finally:
        FLOWER_LOGGER.setLevel(level)


@contextmanager
def _without_forced_collections() -> Iterator[None]:
    """Flower's Bulyan and QFedAvg decode each reply with ``to_numpy_ndarrays(keep_input=False)``, which
    calls ``gc.collect()`` per reply: a full collection walks the whole heap of a ServerApp (a model, its
    data, in a simulation the clients' too), and a Bulyan or QFedAvg run of the main configuration took
    about 230 s instead of 20. Those calls are skipped for the strategy's call: the decoded arrays are
    freed by reference counting all the same, and Python's own collections keep running. (Freezing
    the heap instead, ``gc.freeze``, left cycles uncollected: 0.43 GB more per run.)"""
    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        yield
    finally:
        gc.collect = collect


def _configure(strategy: Strategy, where: str, rnd: int, params: Params, members: list[int]) -> dict[str, Any]:
    """Run the strategy's ``configure_train`` on the model the round starts from; the config it would send.

    A strategy that needs more members than its tier has is stopped with the reason: Flower's
    sampling would otherwise poll for more nodes forever."""
    layer = strategy
    while layer is not None:  # a DP wrapper samples through the strategy it wraps
        needed = max(getattr(layer, "min_available_nodes", 0), getattr(layer, "min_train_nodes", 0))
        if needed > len(members):
            raise ValueError(f"{where}: needs {needed} members, its tier has {len(members)}; "
                             "lower its min_available_nodes / min_train_nodes")
        layer = getattr(layer, "strategy", None)
    with _quiet_strategy():
        messages = list(strategy.configure_train(rnd, arrays_record(params), ConfigRecord(), TierMembers(members)))
    if not messages:
        return {}
    config = next(iter(messages[0].content.config_records.values()), ConfigRecord())
    return {k: v for k, v in config.items() if k != "server-round"}


def _reduce(strategy: Strategy, where: str, rnd: int, replies: list[tuple[Params, dict[str, Any]]]) -> Params | None:
    """The strategy's own ``aggregate_train`` over ``replies``; None when it declines to aggregate or fails.

    A failing strategy leaves the model as it was rather than ending the run: Flower 1.42's
    server-side DP clipping, for one, divides by the norm of each update and fails on an update
    that did not move (a threshold that stayed at 1.0)."""
    try:
        with _quiet_strategy(), _without_forced_collections():
            arrays, _ = strategy.aggregate_train(rnd, [as_reply(i, params, metrics) for i, (params, metrics) in enumerate(replies)])
    except Exception as exc:  # noqa: BLE001 (any strategy's code, a user's included)
        log(WARNING, "round %d: %s failed (%s: %s); its model stays as it was", rnd, where, type(exc).__name__, exc)
        return None
    if arrays is None:
        return None
    # in the replies' dtypes: a server optimizer computes in float64 and would double a float32 head on the wire
    return [a.astype(r.dtype, copy=False) for a, r in zip(record_arrays(arrays), replies[0][0])]


class TieredAggregator:
    """Edge (per cluster) then cloud aggregation of any arrays, each tier by a Flower strategy."""

    def __init__(self, edge: StrategyFactory | None, cloud: StrategyFactory, cluster_of: dict[int, int],
                 names: tuple[str, str] = ("FedAvg", "FedAvg"), min_cluster_updates: int = 1,
                 rank_of: dict[int, int] | None = None) -> None:
        self.edge_factory, self.cloud_factory = edge, cloud
        self.rank_of = dict(rank_of or {})  # node -> its place in aggregation order (its partition id); else its id
        self.names = names  # (edge, cloud), for the log and the report
        self.cluster_of = dict(cluster_of)
        self.min_cluster_updates = min_cluster_updates  # fewer valid updates: the cluster sits the round out
        self.edge: dict[tuple[str, int], Strategy] = {}  # (model, cluster) -> its edge strategy
        self.cloud: dict[str, Strategy] = {}  # model -> its cloud strategy
        self.rejected: list[dict] = []  # updates dropped before aggregation: what, round, node, reason

    @property
    def is_hierarchical(self) -> bool:
        return self.edge_factory is not None

    def _members(self, cluster: int) -> list[int]:
        return sorted(n for n, c in self.cluster_of.items() if c == cluster)

    def _clusters(self) -> list[int]:
        return sorted(set(self.cluster_of.values()))

    def _edge(self, model: str, cluster: int) -> Strategy:
        if (model, cluster) not in self.edge:
            self.edge[model, cluster] = self.edge_factory(len(self._members(cluster)))
        return self.edge[model, cluster]

    def _cloud(self, model: str) -> Strategy:
        if model not in self.cloud:
            self.cloud[model] = self.cloud_factory(len(self._clusters()) if self.is_hierarchical else len(self.cluster_of))
        return self.cloud[model]

    def state(self) -> dict:
        """What a checkpoint needs to resume: the rejections and every strategy (optimizers keep state)."""
        return {"rejected": self.rejected, "edge": self.edge, "cloud": self.cloud}

    def load_state(self, state: dict) -> None:
        self.rejected[:0] = state["rejected"]
        self.edge, self.cloud = state["edge"], state["cloud"]

    def summary(self) -> None:
        clusters = len(self._clusters())
        if self.is_hierarchical:
            log(INFO, "aggregation: edge '%s' in each of %d clusters, then cloud '%s', over %d nodes", *self.names[:1],
                clusters, self.names[1], len(self.cluster_of))
        else:
            log(INFO, "aggregation: flat '%s' over %d nodes in %d clusters", self.names[1], len(self.cluster_of), clusters)

    def configure(self, model: str, rnd: int, cluster_params: dict[int, Params], global_params: Params,
                  cloud: bool = True) -> dict[int, dict[str, Any]]:
        """The config each cluster's clients get this round (e.g. FedProx's ``proximal-mu``), after
        every strategy that aggregates the round has seen the model it starts from (``cluster_params``
        per cluster after an edge round, else ``global_params``)."""
        shared = {}
        if cloud or not self.is_hierarchical:
            members = self._clusters() if self.is_hierarchical else sorted(self.cluster_of)
            shared = _configure(self._cloud(model), f"{model} cloud strategy '{self.names[1]}'", rnd, global_params, members)
        configs = {}
        for cluster in self._clusters():
            own = {}
            if self.is_hierarchical:
                own = _configure(self._edge(model, cluster), f"{model} edge strategy '{self.names[0]}' of cluster {cluster}", rnd,
                                 cluster_params.get(cluster, global_params), self._members(cluster))
            configs[cluster] = {**shared, **own}
        return configs

    def aggregate(self, server_round: int, updates: list[NodeUpdate], spec: UpdateSpec, cloud: bool = True,
                  edge_upload: Callable[[int, Params], Params] | None = None) -> RoundResult | None:
        """Aggregate a round of the model ``spec.name``; ``cloud=False`` stops at the edge. None when no
        valid update is left. Updates that are malformed or do not fit ``spec`` (shape, type, range,
        finiteness) are dropped before any strategy sees them, logged and kept in ``rejected``.
        ``edge_upload(cluster, model)``: what the cloud receives of an edge's model (it may compress it)."""
        # In partition order, whatever order the replies arrived in and whatever ids a simulation gave the
        # nodes: Flower's means add up in the arrays' own dtype (float32 for the head), so the order shows in
        # the last bits, and compression (which rows are largest, how a value rounds) can carry them further.
        valid = sorted((u for u in updates if self._accepted(server_round, u, spec)), key=lambda u: self.rank_of.get(u.node, u.node))
        if self.is_hierarchical:
            valid = self._without_thin_clusters(server_round, valid)
        if not valid:
            return None
        model = spec.name
        by_cluster: dict[int, list[NodeUpdate]] = defaultdict(list)
        for u in valid:
            by_cluster[self.cluster_of[u.node]].append(u)
        weights = {c: float(sum(u.metrics[WEIGHT_KEY] for u in members)) for c, members in sorted(by_cluster.items())}
        if not self.is_hierarchical:
            global_params = _reduce(self._cloud(model), f"the {model} strategy '{self.names[1]}'", server_round,
                                    [(u.params, u.metrics) for u in valid])
            if global_params is None:
                return None
            aggregate = Aggregate(global_params, {c: global_params for c in weights}, weights)
        else:
            cluster_params = {}
            for cluster, members in sorted(by_cluster.items()):
                params = _reduce(self._edge(model, cluster), f"the {model} edge strategy '{self.names[0]}' of cluster {cluster}",
                                 server_round, [(u.params, u.metrics) for u in members])
                if params is None:
                    log(WARNING, "round %d: the edge strategy of cluster %d did not aggregate; it keeps its model", server_round, cluster)
                    continue
                cluster_params[cluster] = params
            weights = {c: w for c, w in weights.items() if c in cluster_params}
            if not cluster_params:
                return None
            global_params = None
            if cloud:
                received = {c: edge_upload(c, p) if edge_upload else p for c, p in cluster_params.items()}
                edge_replies = [(received[c], {**weighted_metrics([u.metrics for u in by_cluster[c]]), WEIGHT_KEY: weights[c]})
                                for c in cluster_params]
                global_params = _reduce(self._cloud(model), f"the {model} cloud strategy '{self.names[1]}'", server_round, edge_replies)
            aggregate = Aggregate(global_params, cluster_params, weights)
        return RoundResult(aggregate, weighted_metrics([u.metrics for u in valid]))

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

    def _without_thin_clusters(self, server_round: int, valid: list[NodeUpdate]) -> list[NodeUpdate]:
        """Drop clusters with fewer than ``min_cluster_updates`` valid updates (they keep their last aggregate)."""
        counts = Counter(self.cluster_of[u.node] for u in valid)
        thin = sorted(c for c, n in counts.items() if n < self.min_cluster_updates)
        if thin:
            log(WARNING, "round %d: clusters %s have fewer than %d valid updates and keep their previous aggregate",
                server_round, thin, self.min_cluster_updates)
        return [u for u in valid if self.cluster_of[u.node] not in thin]


@dataclass(frozen=True)
class Tiers:
    """The strategies a run config names, checked: built once each, so a bad name or argument fails at start."""

    edge: StrategyFactory | None  # None: flat
    cloud: StrategyFactory
    names: tuple[str, str]

    @staticmethod
    def of(cfg: RunConfig) -> Tiers:
        try:
            edge = None if cfg.edge_strategy == NO_EDGE else factory(cfg.edge_strategy, cfg.edge_strategy_args)
            cloud = factory(cfg.cloud_strategy, cfg.cloud_strategy_args)
        except StrategyError as err:
            raise ConfigError(f"run config 'edge-strategy' / 'cloud-strategy': {err}") from err
        return Tiers(edge, cloud, (cfg.edge_strategy, cfg.cloud_strategy))

    def aggregator(self, cluster_of: dict[int, int], min_cluster_updates: int, rank_of: dict[int, int] | None = None) -> TieredAggregator:
        return TieredAggregator(self.edge, self.cloud, cluster_of, self.names, min_cluster_updates, rank_of)

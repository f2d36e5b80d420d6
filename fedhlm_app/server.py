"""fedhlm: the ServerApp (edge servers + cloud), driving FedHLM phase by phase.

1. setup: learn node -> cluster, let clients featurize their data;
2. head rounds: clients fit the SLM head, the strategy aggregates it;
3. threshold rounds: clients escalate uncertain items, the LLM oracle verifies
   them and returns rejection feedback, clients update tau, the strategy
   aggregates tau (edge, then cloud);
4. inference: every client routes its test items under each policy (FedHLM
   and the baselines), the oracle answers the escalated ones, clients score;
5. report: results.json, plot, summary.

Every message is counted in the communication ledger.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedhlm_app.client import load_server_dataset
from fedhlm_app.config import validate
from fedhlm_app.head import SoftmaxHead
from fedhlm_app.ledger import Ledger
from fedhlm_app.oracle import EscalationBatch, Oracle, make_oracle, verify_safely
from fedhlm_app.p2p import PeerCoordinator, prototypes_changed
from fedhlm_app.records import (
    array_items, arrays_record, pack_feedback, pack_prototypes, record_arrays, serialized_size, unpack_class_sums,
    unpack_escalation,
)
from fedhlm_app.report import write_report
from fedhlm_app.strategy import HierarchicalStrategy, make_strategy
from fedhlm_app.updates import UpdateSpec

app = ServerApp()

# Routing policies evaluated on the same test items: name -> (tau, use each client's own tau)
NO_ESCALATION, ALL_ESCALATION = 2.0, -1.0
THRESHOLD_UPDATE = UpdateSpec("threshold", ((1,),), low=0.0, high=1.0)  # one tau in [0, 1]


@dataclass
class Exchange:
    """Sends one phase's messages to nodes, counts bytes, returns the good replies.

    A node that fails in a phase is logged in ``failures``. A node that is gone (the
    SuperLink reports it unavailable, or it does not answer within the timeout) is also
    recorded in ``dropped`` and gets no further messages, so a dead SuperNode costs one
    wait, not one per phase; a node whose ClientApp raised stays in the run.
    """

    grid: Grid
    ledger: Ledger
    timeout: float
    failures: list[dict[str, Any]] = field(default_factory=list)
    min_active: int = 1  # the run stops when fewer nodes remain
    dropped: dict[int, dict[str, Any]] = field(default_factory=dict)  # node -> where and why it left
    nodes: set[int] = field(default_factory=set)  # every node addressed so far

    def __call__(self, phase: str, message_type: str, contents: dict[int, RecordDict], rnd: int | None = None) -> dict[int, Message]:
        contents = {node: content for node, content in contents.items() if node not in self.dropped}
        self.nodes.update(contents)
        messages = []
        for node, content in contents.items():
            items = array_items(content["feedback"], "ids") if "feedback" in content else 0
            # The LLM's verdicts travel on the LLM link and P2P prototypes are booked as phase
            # "p2p"; the rest of the instruction is control traffic of this phase.
            feedback_bytes = _part_size(content, "feedback") if items else 0
            proto_bytes = _part_size(content, "prototypes")
            self.ledger.add(phase, "edge->client", serialized_size(content) - feedback_bytes - proto_bytes)
            if items:
                self.ledger.add(phase, "llm->client", feedback_bytes, items=items)
            if proto_bytes:
                self.ledger.add("p2p", "edge->client", proto_bytes)
            messages.append(Message(content, dst_node_id=node, message_type=message_type))
        received = send_and_receive(self.grid, messages, self.timeout)
        # Errors the SuperLink writes itself (node unavailable) come from the SuperLink's id.
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        replies: dict[int, Message] = {}
        failed: set[int] = set()
        for reply in received:
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                self._fail(phase, rnd, node, str(reply.error.reason), gone=reply.error.code == ErrorCode.NODE_UNAVAILABLE)
                failed.add(node)
                continue
            sums_bytes = _part_size(reply.content, "p2p")
            size = serialized_size(reply.content) - sums_bytes
            items = array_items(reply.content["escalation"], "ids") if "escalation" in reply.content else 0
            # An escalation carries items to the LLM; an empty one is only a control reply.
            self.ledger.add(phase, "client->llm" if items else "client->edge", size, items=items)
            if sums_bytes:
                self.ledger.add("p2p", "client->edge", sums_bytes)
            replies[node] = reply
        for node in set(contents) - set(replies) - failed:
            self._fail(phase, rnd, node, f"no reply within {self.timeout:.0f}s", gone=True)
        active = len(self.nodes) - len(self.dropped)
        if self.dropped and active < self.min_active:
            raise RuntimeError(
                f"{phase}: {active} clients left, fewer than min-active-clients = {self.min_active} "
                f"(dropped out: {sorted(self.dropped)})"
            )
        return replies

    def _fail(self, phase: str, rnd: int | None, node: int, reason: str, gone: bool) -> None:
        where = phase if rnd is None else f"{phase} round {rnd}"
        log(WARNING, "%s: node %s %s: %s", where, node, "dropped out" if gone else "failed", reason)
        self.failures.append({"phase": phase, "round": rnd, "node": node, "reason": reason, "dropped": gone})
        if gone:
            self.dropped[node] = {"phase": phase, "round": rnd, "reason": reason}


# Reply polling: fast at first (a simulated round trip takes milliseconds), then backing off.
FIRST_POLL_S, MAX_POLL_S = 0.005, 0.25


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Push ``messages`` and collect their replies until all are in or ``timeout`` passes.

    ``Grid.send_and_receive`` polls every 0.1 s in simulation and every 3 s in deployment,
    a floor under every exchange; FedHLM exchanges tiny messages many times per round, so
    this polls from 5 ms up, doubling the wait while nothing arrives.
    """
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    wait = FIRST_POLL_S
    while pending and time.monotonic() < deadline:
        pulled = list(grid.pull_messages(pending))
        replies.extend(pulled)
        pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
        wait = FIRST_POLL_S if pulled else min(2 * wait, MAX_POLL_S)
        if pending:
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
    return replies


def _part_size(content: RecordDict, key: str) -> int:
    """Serialized bytes of one record of a message's content (0 when absent)."""
    return serialized_size(RecordDict({key: content[key]})) if key in content else 0


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    """Node ids once ``wanted`` nodes are connected (or whatever is there at the timeout)."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
        time.sleep(1.0)
    if len(nodes) < wanted:
        log(WARNING, "only %d of %d nodes connected after %.0fs", len(nodes), wanted, timeout)
    return nodes


def _record_aggregation_traffic(ledger: Ledger, phase: str, strategy, global_arrays: ArrayRecord) -> None:
    """Edge aggregates go up to the cloud, the global model comes back down, once per cluster."""
    agg = strategy.last
    if agg is None or not strategy.is_hierarchical:
        return
    down = serialized_size(RecordDict({"arrays": global_arrays}))
    for cluster, params in agg.cluster_params.items():
        up = serialized_size(RecordDict({"arrays": arrays_record(params), "metrics": MetricRecord({"num-examples": agg.cluster_weights[cluster]})}))
        ledger.add(phase, "edge->cloud", up)
        ledger.add(phase, "cloud->edge", down)


def _attach_prototypes(content: RecordDict, peers: PeerCoordinator | None, node: int, cluster: int, sent: dict[int, np.ndarray]) -> None:
    """Send a client its cluster's P2P prototypes (and its neighbours') when they changed."""
    view = peers.view(cluster) if peers is not None else None
    if view is None:
        return
    stacked = np.stack([view[0], *view[1]])
    if prototypes_changed(sent.get(node), stacked):  # else the client's cache is still current
        content["prototypes"] = pack_prototypes(*view)
        sent[node] = stacked


def _refresh_peers(peers: PeerCoordinator, replies: dict[int, Message], cluster_of: dict[int, int], ledger: Ledger) -> None:
    """Edge step of P2P: add up clients' per-class sums per cluster, record hit statistics."""
    peers.refresh(
        {node: (cluster_of[node], unpack_class_sums(r.content["p2p"])) for node, r in replies.items() if "p2p" in r.content}
    )
    for node, reply in replies.items():
        metrics = reply.content["metrics"]
        peers.record(cluster_of[node], int(metrics["p2p-attempts"]), int(metrics["p2p-hits"]), int(metrics["p2p-false-hits"]))
    if peers.scope != "none":
        # Each edge shares its prototypes through the cloud and receives its neighbours'.
        for cluster, protos in peers.prototypes().items():
            size = _part_size(RecordDict({"prototypes": pack_prototypes(protos, [])}), "prototypes")
            view = peers.view(cluster)
            ledger.add("p2p", "edge->cloud", size)
            ledger.add("p2p", "cloud->edge", size * len(view[1]) if view else 0)


def _verify(run: Run, phase: str, asked: dict[int, Message], config: ConfigRecord) -> tuple[dict[int, RecordDict], int]:
    """The LLM's verdicts on every client's escalated items, ready to send back; and the item count.

    All clients' items go to the oracle as one batch (model backends batch, servers pool).
    Items the oracle does not answer are left out of the feedback: clients keep the SLM
    draft for them (the fallback) and ask again in the next training round.
    """
    batches = {node: unpack_escalation(reply.content) for node, reply in asked.items()}
    merged = EscalationBatch.concat(list(batches.values()), run.oracle.num_classes)
    result = verify_safely(run.oracle, merged)
    traffic = run.oracle.traffic.drain()
    if traffic.requests:  # networked backends: the HTTP bytes to and from the model server
        run.ledger.add(phase, "cloud->oracle", traffic.sent, items=len(merged), messages=traffic.requests)
        run.ledger.add(phase, "oracle->cloud", traffic.received, messages=traffic.requests)
    if result.failed:
        where = f"{phase} round {config['server-round']}" if "server-round" in config else phase
        log(WARNING, "%s: the oracle did not answer %d of %d items, they keep the SLM draft: %s",
            where, result.failed, len(merged), result.failure)
        run.oracle_failures.append({"phase": phase, "where": where, "items": result.failed, "of": len(merged), "cause": result.failure})
    feedback, start = {}, 0
    for node, batch in batches.items():
        part = result.take(start, start + len(batch))
        start += len(batch)
        feedback[node] = RecordDict({"feedback": pack_feedback(batch.ids[part.answered], part.verdict), "config": config})
    return feedback, len(merged)


@dataclass
class Run:
    """Everything the phases of one run share."""

    cfg: dict[str, Any]
    exchange: Exchange
    oracle: Oracle
    cluster_of: dict[int, int]
    strategy: HierarchicalStrategy
    peers: PeerCoordinator | None
    prototypes_sent: dict[int, np.ndarray] = field(default_factory=dict)  # node -> what it last received
    oracle_failures: list[dict[str, Any]] = field(default_factory=list)  # one entry per batch with unanswered items

    @property
    def ledger(self) -> Ledger:
        return self.exchange.ledger

    def attach_prototypes(self, content: RecordDict, node: int) -> None:
        _attach_prototypes(content, self.peers, node, self.cluster_of[node], self.prototypes_sent)


def setup_phase(exchange: Exchange, grid: Grid, cfg: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Phase 1: every client featurizes its data and reports its cluster and sizes."""
    nodes = wait_for_nodes(grid, cfg["min-clients"] or cfg["num-clients"], cfg["round-timeout"])
    setup = exchange("setup", "query.setup", {n: RecordDict() for n in nodes})
    if not setup:
        raise RuntimeError("no client completed setup; see the client errors above")
    return {n: dict(r.content["info"]) for n, r in setup.items()}


def is_cloud_round(rnd: int, last: int, every: int) -> bool:
    """The cloud aggregates every ``every``-th round and always the last; other rounds stop at the edge."""
    return rnd % every == 0 or rnd == last


def head_phase(run: Run, dim: int, num_classes: int) -> tuple[ArrayRecord, list[dict[str, float]]]:
    """Phase 2: federated training of the SLM head, aggregated edge then cloud."""
    initial = SoftmaxHead(dim, num_classes).get_params()
    arrays, spec = arrays_record(initial), UpdateSpec.like("head", initial)
    edge_arrays: dict[int, ArrayRecord] = {}  # after an edge round: each cluster's own model
    history = []
    for rnd in range(1, run.cfg["head-rounds"] + 1):
        round_started = time.monotonic()
        conf = ConfigRecord({"server-round": rnd})
        content = {c: RecordDict({"arrays": edge_arrays.get(c, arrays), "config": conf}) for c in set(run.cluster_of.values())}
        replies = run.exchange("head", "train.head", {n: content[c] for n, c in run.cluster_of.items()}, rnd)
        cloud = is_cloud_round(rnd, run.cfg["head-rounds"], run.cfg["cloud-every"])
        new_arrays, metrics = run.strategy.aggregate_train(rnd, replies.values(), cloud=cloud, spec=spec)
        if metrics is None:
            continue
        if new_arrays is not None:
            arrays, edge_arrays = new_arrays, {}
            _record_aggregation_traffic(run.ledger, "head", run.strategy, arrays)
        else:  # a cluster without valid updates this round keeps its model
            edge_arrays.update({c: arrays_record(p) for c, p in run.strategy.last.cluster_params.items()})
        history.append({"round": rnd, **{k: float(v) for k, v in metrics.items()}, "cloud": new_arrays is not None,
                        "seconds": time.monotonic() - round_started})
        log(INFO, "head round %d: train loss %.4f, train accuracy %.4f", rnd, metrics["train-loss"], metrics["train-accuracy"])
    return arrays, history


def threshold_phase(run: Run, head: ArrayRecord) -> tuple[float, list[dict[str, Any]], int]:
    """Phase 3: escalate, verify, step tau locally, aggregate edge then cloud; refresh P2P."""
    tau_global = run.cfg["tau-init"]
    tau_edge: dict[int, float] = {}  # after an edge round: each cluster's own threshold
    rounds, training_escalations = [], 0
    for rnd in range(1, run.cfg["threshold-rounds"] + 1):
        round_started = time.monotonic()
        contents = {}
        for node, cluster in run.cluster_of.items():
            reference = tau_edge.get(cluster, tau_global)
            contents[node] = RecordDict({"config": ConfigRecord({"split": "calibration", "tau-reference": reference, "server-round": rnd})})
            if rnd == 1:
                contents[node]["arrays"] = head  # the final head travels once
            run.attach_prototypes(contents[node], node)
        asked = run.exchange("threshold", "query.escalate", contents, rnd)
        feedback, round_items = _verify(run, "threshold", asked, ConfigRecord({"server-round": rnd}))
        training_escalations += round_items
        replies = run.exchange("threshold", "train.threshold", feedback, rnd)
        if run.peers is not None:
            _refresh_peers(run.peers, replies, run.cluster_of, run.ledger)
        cloud = is_cloud_round(rnd, run.cfg["threshold-rounds"], run.cfg["cloud-every"])
        tau_arrays, metrics = run.strategy.aggregate_train(rnd, replies.values(), cloud=cloud, spec=THRESHOLD_UPDATE)
        if metrics is None:
            log(WARNING, "threshold round %d: no updates, keeping tau = %.4f", rnd, tau_global)
            continue
        edge_taus = {c: float(p[0][0]) for c, p in run.strategy.last.cluster_params.items()}
        if tau_arrays is not None:
            _record_aggregation_traffic(run.ledger, "threshold", run.strategy, tau_arrays)
            tau_global, tau_edge = float(record_arrays(tau_arrays)[0][0]), {}
        else:  # a cluster without valid updates this round keeps its threshold
            tau_edge.update(edge_taus)
        per_cluster = {str(c): t for c, t in edge_taus.items()}
        rounds.append(
            {
                "round": rnd,
                "tau_global": tau_global,  # unchanged after an edge round
                "tau_clusters": per_cluster,
                "cloud": tau_arrays is not None,
                "loss": float(metrics["loss"]),
                "escalation_rate": float(metrics["escalation-rate"]),
                "llm_items": round_items,
                "clients": len(replies),
                "seconds": time.monotonic() - round_started,
            }
        )
        log(INFO, "threshold round %d: tau %.4f, clusters %s, loss %.4f, calibration escalation %.3f",
            rnd, tau_global, {c: round(t, 3) for c, t in per_cluster.items()}, metrics["loss"], metrics["escalation-rate"])
    return tau_global, rounds, training_escalations


def inference_phase(run: Run, tau_global: float) -> dict[str, dict[int, dict[str, float]]]:
    """Phase 4: every routing policy on the same test items; per-client scores per policy."""
    peers = run.peers
    # name -> (tau, each client's own threshold, peers tried first)
    policies = {
        "fedhlm": (tau_global, True, peers is not None),
        **({"fedhlm_no_p2p": (tau_global, True, False)} if peers is not None else {}),
        "slm_only": (NO_ESCALATION, False, False),
        "static_threshold": (run.cfg["static-threshold"], False, False),
        "cloud_only": (ALL_ESCALATION, False, False),
    }
    evaluation: dict[str, dict[int, dict[str, float]]] = {}
    for name, (tau, own, use_peers) in policies.items():
        phase = f"inference:{name}"
        contents, tried = {}, {}
        for node, cluster in run.cluster_of.items():
            # Opportunistic collaboration: peers only where the cluster's hit rate pays for them.
            tried[node] = use_peers and peers.enabled(cluster)
            conf = {"split": "test", "tau": float(tau), "own-threshold": own, "tau-reference": tau_global, "try-p2p": tried[node]}
            contents[node] = RecordDict({"config": ConfigRecord(conf)})
            if tried[node]:
                run.attach_prototypes(contents[node], node)  # the latest refresh
        asked = run.exchange(phase, "query.escalate", contents)
        feedback, _ = _verify(run, phase, asked, ConfigRecord({"policy": name}))
        scored = run.exchange(phase, "evaluate.hlm", feedback)
        evaluation[name] = {
            node: {
                **{k: float(v) for k, v in r.content["metrics"].items()},
                "tau": float(asked[node].content["metrics"]["tau"]),
                "try-p2p": float(tried[node]),
            }
            for node, r in scored.items()
        }
    # Policies are compared on the same items: a node missing under any policy leaves them all.
    complete = set.intersection(*(set(per_node) for per_node in evaluation.values()))
    if any(set(per_node) != complete for per_node in evaluation.values()):
        log(WARNING, "inference: scoring the %d nodes that answered under every policy", len(complete))
    return {name: {n: row for n, row in per_node.items() if n in complete} for name, per_node in evaluation.items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedHLM end to end and write the report."""
    started, started_epoch = time.monotonic(), time.time()  # the epoch lets bench/ place the app in a launch
    cfg = validate(context.run_config)  # fail fast, before anything loads
    dataset = load_server_dataset(cfg)  # fails fast on missing/malformed data
    oracle = make_oracle(cfg, dataset)  # loads its model (or checks its server) before clients featurize
    exchange = Exchange(grid, Ledger(), cfg["round-timeout"], min_active=cfg["min-active-clients"])
    timings: dict[str, float] = {}

    t0 = time.monotonic()
    info = setup_phase(exchange, grid, cfg)
    cluster_of = {n: int(i["cluster-id"]) for n, i in info.items()}
    peers = PeerCoordinator(cfg["p2p-neighbours"], cfg["p2p-neighbour-k"], cfg["p2p-cost"], cfg["llm-cost"]) if cfg["p2p"] else None
    run = Run(cfg, exchange, oracle, cluster_of, make_strategy(cfg, cluster_of), peers)
    run.strategy.summary()
    log(INFO, "setup: %d clients in clusters %s", len(info), sorted(set(cluster_of.values())))
    timings["setup"] = time.monotonic() - t0

    t0 = time.monotonic()
    any_info = next(iter(info.values()))
    head, head_rounds = head_phase(run, int(any_info["dim"]), int(any_info["num-classes"]))
    timings["head"] = time.monotonic() - t0

    t0 = time.monotonic()
    tau_global, rounds, training_escalations = threshold_phase(run, head)
    timings["threshold"] = time.monotonic() - t0

    t0 = time.monotonic()
    evaluation = inference_phase(run, tau_global)
    timings["inference"] = time.monotonic() - t0

    write_report(
        cfg=cfg,
        dataset_source=dataset.source,
        class_names=dataset.class_names,
        info=info,
        evaluation=evaluation,
        rounds=rounds,
        head_rounds=head_rounds,
        ledger=run.ledger,
        training_escalations=training_escalations,
        failures=exchange.failures,
        dropped=exchange.dropped,
        rejected=run.strategy.rejected,
        oracle_failures=run.oracle_failures,
        peers=peers,
        head_params=record_arrays(head),
        timings={**timings, "total": time.monotonic() - started},
        started_epoch=started_epoch,
    )
    oracle.close()

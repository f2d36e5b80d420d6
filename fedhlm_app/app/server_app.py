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
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedhlm_app.app import checkpoint
from fedhlm_app.app.client_app import load_server_dataset
from fedhlm_app.config import validate
from fedhlm_app.slm.finetune import EncoderTuner
from fedhlm_app.slm.head import head_from_config
from fedhlm_app.reporting.ledger import Ledger
from fedhlm_app.oracle.base import EscalationBatch, Oracle, make_oracle, verify_safely
from fedhlm_app.routing.p2p import PeerCoordinator, prototypes_changed
from fedhlm_app.app.protocol import (
    array_items, arrays_record, pack_feedback, pack_prototypes, record_arrays, serialized_size, to_array, unpack_class_sums,
    unpack_escalation, unpack_feedback,
)
from fedhlm_app.reporting.results import resolve_results_dir, write_report
from fedhlm_app.fl.strategy import HierarchicalStrategy, make_strategy
from fedhlm_app.fl.updates import UpdateSpec

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

    def drop(self, phase: str, node: int, reason: str) -> None:
        """Take ``node`` out of the run (recorded like a dropout)."""
        self._fail(phase, None, node, reason, gone=True)

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
    partition_of: dict[int, int]  # node -> partition id (how a resumed run finds its clients again)
    progress: checkpoint.Progress
    checkpoint_path: Path
    prototypes_sent: dict[int, np.ndarray] = field(default_factory=dict)  # node -> what it last received
    oracle_failures: list[dict[str, Any]] = field(default_factory=list)  # one entry per batch with unanswered items
    needs_state: set[int] = field(default_factory=set)  # nodes still to receive the head (and a resumed state)
    pooled_label_counts: np.ndarray | None = None  # every client's label counts added up (local-label-prior)

    @property
    def ledger(self) -> Ledger:
        return self.exchange.ledger

    def attach_prototypes(self, content: RecordDict, node: int) -> None:
        _attach_prototypes(content, self.peers, node, self.cluster_of[node], self.prototypes_sent)

    def attach_state(self, content: RecordDict, node: int) -> None:
        """Until a node has answered once after head training: the final head, and what a resumed client held."""
        if node not in self.needs_state:
            return
        content["arrays"] = arrays_record(self.progress.head.params)
        if self.pooled_label_counts is not None:
            content["label-counts"] = ArrayRecord({"pooled": to_array(self.pooled_label_counts)})
        held = self.progress.clients.get(self.partition_of[node])
        if held:
            content["restore"] = ArrayRecord({k: to_array(v) for k, v in held.items()})

    def save(self) -> None:
        """Checkpoint after a completed round (atomic)."""
        self.progress.server = {
            "ledger": self.ledger, "failures": self.exchange.failures, "peers": self.peers,
            "strategy": self.strategy.state(), "oracle_failures": self.oracle_failures, "partition_of": self.partition_of,
        }
        checkpoint.save(self.checkpoint_path, self.cfg, self.progress)

    def restore_server_state(self) -> None:
        """After a resume: the saved failures, P2P state and strategy state, on today's node ids."""
        saved = self.progress.server
        if not saved:
            return
        self.exchange.failures[:0] = saved["failures"]
        self.oracle_failures[:0] = saved["oracle_failures"]
        self.strategy.load_state(saved["strategy"])
        if self.peers is not None and saved["peers"] is not None:
            node_of_partition = {pid: node for node, pid in self.partition_of.items()}
            self.peers = saved["peers"]
            self.peers.rename_nodes({old: node_of_partition[pid] for old, pid in saved["partition_of"].items() if pid in node_of_partition})


def setup_phase(exchange: Exchange, grid: Grid, cfg: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Phase 1: every client featurizes its data and reports its cluster and sizes."""
    nodes = wait_for_nodes(grid, cfg["min-clients"] or cfg["num-clients"], cfg["round-timeout"])
    setup = exchange("setup", "query.setup", {n: RecordDict() for n in nodes})
    info = {n: dict(r.content["info"]) for n, r in setup.items()}
    for node, row in info.items():  # nothing to train or calibrate on: skipped, counted as a dropout
        if min(int(row["n-fit"]), int(row["n-calibration"])) == 0:
            exchange.drop("setup", node, f"empty partition (fit {row['n-fit']}, calibration {row['n-calibration']} rows)")
    info = {n: row for n, row in info.items() if n not in exchange.dropped}
    if not info:
        raise RuntimeError("no client completed setup with data; see the client errors above")
    return info


def pooled_label_counts(info: dict[int, dict[str, Any]]) -> np.ndarray | None:
    """The label counts the clients reported at setup, added up (None when they report none)."""
    counts = [np.asarray(row["label-counts"], dtype=np.float64) for row in info.values() if "label-counts" in row]
    return np.sum(counts, axis=0) if counts else None


def is_cloud_round(rnd: int, last: int, every: int) -> bool:
    """The cloud aggregates every ``every``-th round and always the last; other rounds stop at the edge."""
    return rnd % every == 0 or rnd == last


def train_rounds(run: Run, name: str, rounds: int, model: checkpoint.TrainedModel) -> None:
    """Federated training of ``model`` by the clients' ``train.<name>`` handler for ``rounds``
    rounds, aggregated edge then cloud; checkpointed after every round."""
    spec = UpdateSpec.like(name, model.params)
    for rnd in range(model.done + 1, rounds + 1):
        round_started = time.monotonic()
        conf = ConfigRecord({"server-round": rnd})
        arrays = arrays_record(model.params)
        # after an edge round each cluster continues from its own model
        content = {c: RecordDict({"arrays": arrays_record(model.edge_params[c]) if c in model.edge_params else arrays, "config": conf})
                   for c in set(run.cluster_of.values())}
        replies = run.exchange(name, f"train.{name}", {n: content[c] for n, c in run.cluster_of.items()}, rnd)
        cloud = is_cloud_round(rnd, rounds, run.cfg["cloud-every"])
        new_arrays, metrics = run.strategy.aggregate_train(rnd, replies.values(), cloud=cloud, spec=spec)
        if metrics is not None:
            if new_arrays is not None:
                model.params, model.edge_params = record_arrays(new_arrays), {}
                _record_aggregation_traffic(run.ledger, name, run.strategy, new_arrays)
            else:  # a cluster without valid updates this round keeps its model
                model.edge_params.update(run.strategy.last.cluster_params)
            model.history.append({"round": rnd, **{k: float(v) for k, v in metrics.items()}, "cloud": new_arrays is not None,
                                  "seconds": time.monotonic() - round_started})
            log(INFO, "%s round %d: %s", name, rnd, ", ".join(f"{k} {float(v):.4f}" for k, v in metrics.items() if k != "num-examples"))
        model.done = rnd
        run.save()


def encoder_phase(run: Run, num_classes: int) -> dict[int, dict[str, Any]]:
    """Phase 2a (``encoder-rounds`` > 0): federated fine-tuning of the encoder's top layers, then
    every client installs the result and featurizes its data with it. Returns the clients'
    new info (the embedding width may change only with the model, but it is re-read)."""
    p, cfg = run.progress, run.cfg
    if p.encoder.params is None:
        # a fresh tuner, not the per-process cached one: in-process clients may have trained that one
        p.encoder.params = EncoderTuner(cfg["slm-model"], cfg["encoder-layers"], num_classes).get_arrays()
    train_rounds(run, "encoder", cfg["encoder-rounds"], p.encoder)
    install = RecordDict({"arrays": arrays_record(p.encoder.params)})
    replies = run.exchange("encoder", "query.encoder", {n: install for n in run.cluster_of})
    return {n: dict(r.content["info"]) for n, r in replies.items()}


def head_phase(run: Run, dim: int, num_classes: int) -> None:
    """Phase 2b: federated training of the SLM head, aggregated edge then cloud (``progress.head``)."""
    if run.progress.head.params is None:
        run.progress.head.params = head_from_config(run.cfg, dim, num_classes, seed=run.cfg["seed"]).get_params()
    train_rounds(run, "head", run.cfg["head-rounds"], run.progress.head)


def threshold_phase(run: Run) -> None:
    """Phase 3: escalate, verify, step tau locally, aggregate edge then cloud; refresh P2P."""
    p = run.progress
    if p.tau_global is None:
        p.tau_global = run.cfg["tau-init"]
    for rnd in range(p.threshold_done + 1, run.cfg["threshold-rounds"] + 1):
        round_started = time.monotonic()
        contents = {}
        for node, cluster in run.cluster_of.items():
            reference = p.tau_edge.get(cluster, p.tau_global)
            contents[node] = RecordDict({"config": ConfigRecord({"split": "calibration", "tau-reference": reference, "server-round": rnd})})
            run.attach_state(contents[node], node)  # the final head travels once
            run.attach_prototypes(contents[node], node)
        asked = run.exchange("threshold", "query.escalate", contents, rnd)
        run.needs_state.difference_update(asked)  # they hold the head now
        feedback, round_items = _verify(run, "threshold", asked, ConfigRecord({"server-round": rnd}))
        p.training_escalations += round_items
        for node, content in feedback.items():  # what each client now holds, for a resumed run
            ids, verdict = unpack_feedback(content["feedback"])
            p.remember_feedback(run.partition_of[node], ids, verdict.beta.astype(np.float32), verdict.final)
        replies = run.exchange("threshold", "train.threshold", feedback, rnd)
        for node, reply in replies.items():
            own_tau = _reply_threshold(reply)
            if own_tau is not None:
                p.remember_tau(run.partition_of[node], own_tau)
        if run.peers is not None:
            _refresh_peers(run.peers, replies, run.cluster_of, run.ledger)
        cloud = is_cloud_round(rnd, run.cfg["threshold-rounds"], run.cfg["cloud-every"])
        tau_arrays, metrics = run.strategy.aggregate_train(rnd, replies.values(), cloud=cloud, spec=THRESHOLD_UPDATE)
        if metrics is None:
            log(WARNING, "threshold round %d: no updates, keeping tau = %.4f", rnd, p.tau_global)
            p.threshold_done = rnd
            run.save()
            continue
        edge_taus = {c: float(p[0][0]) for c, p in run.strategy.last.cluster_params.items()}
        if tau_arrays is not None:
            _record_aggregation_traffic(run.ledger, "threshold", run.strategy, tau_arrays)
            p.tau_global, p.tau_edge = float(record_arrays(tau_arrays)[0][0]), {}
        else:  # a cluster without valid updates this round keeps its threshold
            p.tau_edge.update(edge_taus)
        per_cluster = {str(c): t for c, t in edge_taus.items()}
        p.rounds.append(
            {
                "round": rnd,
                "tau_global": p.tau_global,  # unchanged after an edge round
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
            rnd, p.tau_global, {c: round(t, 3) for c, t in per_cluster.items()}, metrics["loss"], metrics["escalation-rate"])
        p.threshold_done = rnd
        run.save()


def _reply_threshold(reply: Message) -> float | None:
    """The threshold a client reports holding (None when its reply is not a finite number)."""
    try:
        tau = float(record_arrays(reply.content["arrays"])[0].reshape(-1)[0])
    except Exception:  # noqa: BLE001 - a malformed reply; the strategy rejects and records it
        return None
    return tau if np.isfinite(tau) else None


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
            run.attach_state(contents[node], node)  # a run resumed after threshold training
            if tried[node]:
                run.attach_prototypes(contents[node], node)  # the latest refresh
        asked = run.exchange(phase, "query.escalate", contents)
        run.needs_state.difference_update(asked)
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
    """Run FedHLM end to end (or on from its checkpoint) and write the report."""
    started, started_epoch = time.monotonic(), time.time()  # the epoch lets bench/ place the app in a launch
    cfg = validate(context.run_config)  # fail fast, before anything loads
    cfg["run-name"] = cfg["run-name"] or time.strftime("%Y%m%d-%H%M%S")  # fixed now: the checkpoint lives there
    checkpoint_path = resolve_results_dir(cfg["results-dir"]) / cfg["run-name"] / checkpoint.CHECKPOINT_FILE
    progress = checkpoint.load(checkpoint_path, cfg) if cfg["resume"] else None
    if cfg["resume"]:
        log(INFO, "resume: %s", f"from encoder round {progress.encoder.done}, head round {progress.head.done}, "
            f"threshold round {progress.threshold_done}"
            if progress else f"no checkpoint at {checkpoint_path}, starting from the beginning")
    dataset = load_server_dataset(cfg)  # fails fast on missing/malformed data
    oracle = make_oracle(cfg, dataset)  # loads its model (or checks its server) before clients featurize
    # a resumed run books its traffic on top of what the crashed one had sent
    ledger = progress.server["ledger"] if progress and progress.server else Ledger()
    exchange = Exchange(grid, ledger, cfg["round-timeout"], min_active=cfg["min-active-clients"])
    timings: dict[str, float] = {}

    t0 = time.monotonic()
    info = setup_phase(exchange, grid, cfg)
    cluster_of = {n: int(i["cluster-id"]) for n, i in info.items()}
    peers = PeerCoordinator(cfg["p2p-neighbours"], cfg["p2p-neighbour-k"], cfg["p2p-cost"], cfg["llm-cost"]) if cfg["p2p"] else None
    run = Run(cfg, exchange, oracle, cluster_of, make_strategy(cfg, cluster_of), peers,
              partition_of={n: int(i["partition-id"]) for n, i in info.items()}, progress=progress or checkpoint.Progress(),
              checkpoint_path=checkpoint_path, needs_state=set(cluster_of), pooled_label_counts=pooled_label_counts(info))
    run.restore_server_state()
    run.strategy.summary()
    log(INFO, "setup: %d clients in clusters %s", len(info), sorted(set(cluster_of.values())))
    timings["setup"] = time.monotonic() - t0

    any_info = next(iter(info.values()))
    if cfg["encoder-rounds"]:
        t0 = time.monotonic()
        any_info = next(iter(encoder_phase(run, int(any_info["num-classes"])).values()), any_info)
        timings["encoder"] = time.monotonic() - t0

    t0 = time.monotonic()
    head_phase(run, int(any_info["dim"]), int(any_info["num-classes"]))
    timings["head"] = time.monotonic() - t0

    t0 = time.monotonic()
    threshold_phase(run)
    timings["threshold"] = time.monotonic() - t0

    t0 = time.monotonic()
    evaluation = inference_phase(run, run.progress.tau_global)
    timings["inference"] = time.monotonic() - t0

    write_report(
        cfg=cfg,
        dataset_source=dataset.source,
        class_names=dataset.class_names,
        info=info,
        evaluation=evaluation,
        rounds=run.progress.rounds,
        head_rounds=run.progress.head.history,
        encoder_rounds=run.progress.encoder.history,
        ledger=run.ledger,
        training_escalations=run.progress.training_escalations,
        failures=exchange.failures,
        dropped=exchange.dropped,
        rejected=run.strategy.rejected,
        oracle_failures=run.oracle_failures,
        peers=run.peers,
        head_params=run.progress.head.params,
        encoder_params=run.progress.encoder.params,
        timings={**timings, "total": time.monotonic() - started},
        started_epoch=started_epoch,
    )
    oracle.close()

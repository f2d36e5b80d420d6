"""The phases of a FedHLM run on the server: who is sent what, and what comes back.

1. ``setup``: every client loads (and featurizes) its data and reports its placement;
2. ``encoder_phase`` (``encoder-rounds`` > 0): federated fine-tuning of the encoder's top layers;
3. ``head_phase``: federated training of the SLM head; ``install_head`` sends the result;
4. ``threshold_phase``: clients escalate calibration items, the LLM oracle verifies them, clients
   step tau, the aggregator averages tau (edge, then cloud); P2P prototypes are built;
5. ``inference_phase``: with P2P, each edge first certifies where peer answers meet the error
   bound (``certify_peers``); every client routes its test items under each policy (FedHLM and
   the baselines), the oracle answers the escalated ones, clients score them.

Every phase checkpoints after each round (``Run.save``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from functools import partial
from logging import INFO, WARNING

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedhlm_app.app import protocol
from fedhlm_app.app.checkpoint import TrainedModel
from fedhlm_app.app.exchange import Exchange, wait_for_nodes
from fedhlm_app.app.protocol import Calibrate, Escalation, Feedback, NodeInfo, QueryPolicy, RouteQueries, Train
from fedhlm_app.app.run_state import Run
from fedhlm_app.config import RunConfig
from fedhlm_app.fl.compression import EXACT, Codec, Params
from fedhlm_app.fl.model_sync import ModelDelta, ModelSync
from fedhlm_app.fl.tiers import NodeUpdate, RoundResult
from fedhlm_app.fl.updates import UpdateSpec
from fedhlm_app.oracle.base import EscalationBatch, verify_safely
from fedhlm_app.routing.p2p import Prototypes, prototypes_changed
from fedhlm_app.slm.finetune import EncoderTuner
from fedhlm_app.slm.head import head_from_config

THRESHOLD_UPDATE = UpdateSpec("threshold", ((1,),), low=0.0, high=1.0)  # one tau in [0, 1]
NO_ESCALATION, ALL_ESCALATION = 2.0, -1.0  # thresholds no uncertainty reaches / every uncertainty exceeds


def setup(exchange: Exchange, grid: Grid, cfg: RunConfig) -> dict[int, NodeInfo]:
    """Phase 1: every client featurizes its data and reports its cluster and sizes."""
    nodes = wait_for_nodes(grid, cfg.min_clients or cfg.num_clients, cfg.round_timeout, cfg.node_wait)
    replies = exchange("setup", protocol.SETUP, {n: RecordDict() for n in nodes})
    info = {n: NodeInfo.unpack(r.content) for n, r in replies.items()}
    for node, row in info.items():  # nothing to train or calibrate on: skipped, counted as a dropout
        if min(row.n_fit, row.n_calibration) == 0:
            exchange.drop("setup", node, f"empty partition (fit {row.n_fit}, calibration {row.n_calibration} rows)")
    info = {n: row for n, row in info.items() if n not in exchange.dropped}
    if not info:
        raise RuntimeError("no client completed setup with data; see the client errors above")
    return info


def is_cloud_round(rnd: int, last: int, every: int) -> bool:
    """The cloud aggregates every ``every``-th round and always the last; other rounds stop at the edge."""
    return rnd % every == 0 or rnd == last


def _book_aggregation(run: Run, phase: str, result: RoundResult) -> None:
    """A threshold round: edge aggregates go up to the cloud, the global one comes back down, once per cluster."""
    if not run.aggregator.is_hierarchical or not result.is_cloud_round:
        return
    down = protocol.arrays_size(result.aggregate.global_params)
    for params in result.aggregate.cluster_params.values():
        run.ledger.add(phase, "edge->cloud", protocol.arrays_size(params, with_weight=True))
        run.ledger.add(phase, "cloud->edge", down)


def _aggregate(run: Run, phase: str, rnd: int, updates: list[NodeUpdate], spec: UpdateSpec, last: int) -> RoundResult | None:
    cloud = is_cloud_round(rnd, last, run.cfg.cloud_every)
    result = run.aggregator.aggregate(rnd, updates, spec, cloud=cloud)
    if result is not None:
        _book_aggregation(run, phase, result)
    return result


def _broadcasts(run: Run, phase: str, model: TrainedModel, codec: Codec | None = None) -> dict[int, ModelDelta]:
    """Each cluster's message for the round: what moves its clients' replica to the cluster's model
    (its own after an edge round, else the global one, which the cloud sends its edge first)."""
    if model.sync is None:
        model.sync = ModelSync(run.cfg.upload_codec, run.cfg.broadcast_codec)
    out = {}
    for cluster in sorted(set(run.cluster_of.values())):
        own = model.edge_params.get(cluster)
        out[cluster] = model.sync.broadcast(cluster, model.params if own is None else own, codec)
        if own is None and run.aggregator.is_hierarchical:
            run.ledger.add(phase, "cloud->edge", protocol.model_message_size(out[cluster]))
    return out


def _edge_upload(run: Run, phase: str, sync: ModelSync) -> Callable[[int, Params], Params]:
    """An edge's aggregate as the cloud receives it (compressed like a client's update), booked."""
    def upload(cluster: int, params: Params) -> Params:
        message, received = sync.edge_upload(cluster, params)
        run.ledger.add(phase, "edge->cloud", protocol.model_message_size(message, with_weight=True))
        return received
    return upload


def _messages(run: Run, model: TrainedModel, broadcasts: dict[int, ModelDelta], pack: Callable[[int, ModelDelta], RecordDict]
              ) -> dict[int, RecordDict]:
    """Each node's content: its cluster's broadcast (packed once per cluster), or the replica whole where it fell behind."""
    packed = {c: pack(c, b) for c, b in broadcasts.items()}
    contents = {}
    for node, cluster in run.cluster_of.items():
        message = model.sync.message_for(node, cluster, broadcasts[cluster])
        contents[node] = packed[cluster] if message is broadcasts[cluster] else pack(cluster, message)
    return contents


def _final_broadcasts(run: Run, phase: str, model: TrainedModel) -> dict[int, ModelDelta]:
    """The install messages: the last broadcast, with every changed row (the residual a partial broadcast
    left is not lost), exact where edge rounds left the clusters' replicas apart, so that every client
    installs the same model, which becomes the run's model."""
    codec = run.cfg.broadcast_codec
    if model.sync is not None and not model.sync.replicas_agree():
        codec = EXACT
    elif codec is not None:
        codec = dataclasses.replace(codec, share=1.0)
    broadcasts = _broadcasts(run, phase, model, codec)
    model.params, model.edge_params = model.sync.held[min(broadcasts)], {}
    return broadcasts


def train_rounds(run: Run, name: str, message_type: str, rounds: int, model: TrainedModel) -> None:
    """Federated training of ``model`` (``name``: the phase and what is aggregated) by the clients'
    ``message_type`` handler for ``rounds`` rounds, aggregated edge then cloud; checkpointed after every round.
    Models travel as compressed deltas from the clients' replicas (``fedhlm_app.fl.model_sync``)."""
    spec = UpdateSpec.like(name, model.params)
    for rnd in range(model.done + 1, rounds + 1):
        round_started = time.monotonic()
        broadcasts = _broadcasts(run, name, model)
        sync, cloud = model.sync, is_cloud_round(rnd, rounds, run.cfg.cloud_every)
        # every strategy sees the model its clients start from: the replica they hold
        round_config = run.aggregator.configure(name, rnd, {c: sync.held[c] for c in broadcasts}, model.params, cloud)
        contents = _messages(run, model, broadcasts, lambda c, m, rnd=rnd, config=round_config: Train(m, rnd, config[c]).pack())
        replies = run.exchange(name, message_type, contents, rnd)
        for node in replies:
            sync.acknowledge(node, run.cluster_of[node])
        updates = [protocol.node_update(n, r.content, partial(sync.client_model, run.cluster_of[n])) for n, r in replies.items()]
        result = run.aggregator.aggregate(rnd, updates, spec, cloud=cloud, edge_upload=_edge_upload(run, name, sync))
        if result is not None:
            if result.is_cloud_round:
                model.params, model.edge_params = result.aggregate.global_params, {}
            else:  # a cluster without valid updates this round keeps its model
                model.edge_params.update(result.aggregate.cluster_params)
            model.history.append({"round": rnd, **result.metrics, "cloud": result.is_cloud_round,
                                  "seconds": time.monotonic() - round_started})
            log(INFO, "%s round %d: %s", name, rnd, ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if k != "num-examples"))
        model.done = rnd
        run.save()


def encoder_phase(run: Run, num_classes: int) -> None:
    """Phase 2a (``encoder-rounds`` > 0): federated fine-tuning of the encoder's top layers, then
    every client installs the result and featurizes its data with it (its info is re-read)."""
    p, cfg = run.progress, run.cfg
    if p.encoder.params is None:
        # a fresh tuner, not the per-process cached one: in-process clients may have trained that one
        p.encoder.params = EncoderTuner(cfg.slm_model, cfg.encoder_layers, num_classes).get_arrays()
    train_rounds(run, "encoder", protocol.TRAIN_ENCODER, cfg.encoder_rounds, p.encoder)
    broadcasts = _final_broadcasts(run, "encoder", p.encoder)
    contents = _messages(run, p.encoder, broadcasts, lambda c, m: RecordDict({"model": protocol.pack_model(m)}))
    replies = run.exchange("encoder", protocol.INSTALL_ENCODER, contents)
    run.info.update({n: NodeInfo.unpack(r.content) for n, r in replies.items()})


def head_phase(run: Run) -> None:
    """Phase 2b: federated training of the SLM head, aggregated edge then cloud (``progress.head``)."""
    any_info = next(iter(run.info.values()))
    if run.progress.head.params is None:
        run.progress.head.params = head_from_config(run.cfg, any_info.dim, any_info.num_classes, seed=run.cfg.seed).get_params()
    train_rounds(run, "head", protocol.TRAIN_HEAD, run.cfg.head_rounds, run.progress.head)


def install_head(run: Run) -> None:
    """Every client keeps the final head's outputs (and, on a resumed run, gets back what it had learned)."""
    pooled, head = run.pooled_label_counts, run.progress.head
    broadcasts = _final_broadcasts(run, "head", head)
    contents = {n: protocol.InstallHead(head.sync.message_for(n, c, broadcasts[c]), pooled, run.memory_of(n)).pack()
                for n, c in run.cluster_of.items()}
    run.exchange("head", protocol.INSTALL_HEAD, contents)


def _prototypes_for(run: Run, node: int) -> Prototypes | None:
    """The cluster's P2P prototypes (and its neighbours') when they changed since the node last got them."""
    view = run.peers.view(run.cluster_of[node]) if run.peers is not None else None
    if view is None:
        return None
    stacked = view.stacked()
    if not prototypes_changed(run.prototypes_sent.get(node), stacked):  # the client's cache is still current
        return None
    run.prototypes_sent[node] = stacked
    return view


def _refresh_peers(run: Run, replies: dict[int, Message]) -> None:
    """Edge step of P2P: add up clients' per-class sums per cluster into its prototypes."""
    peers, cluster_of = run.peers, run.cluster_of
    sums = {node: protocol.ThresholdReply.class_sums_of(r.content) for node, r in replies.items()}
    peers.refresh({node: (cluster_of[node], s) for node, s in sums.items() if s is not None})
    if peers.scope != "none":
        # Each edge shares its prototypes through the cloud when they moved, and gets its neighbours' when theirs did.
        for cluster, own in peers.prototypes().items():
            size = protocol.prototypes_size(Prototypes(own, []))  # one cluster's prototypes
            if prototypes_changed(run.edge_prototypes_sent.get(cluster), own):
                run.edge_prototypes_sent[cluster] = own
                run.ledger.add("p2p", "edge->cloud", size)
            view = peers.view(cluster)
            if view is not None and view.neighbours:
                theirs = np.stack(view.neighbours)
                if prototypes_changed(run.neighbour_prototypes_sent.get(cluster), theirs):
                    run.neighbour_prototypes_sent[cluster] = theirs
                    run.ledger.add("p2p", "cloud->edge", size * len(view.neighbours))


def certify_peers(run: Run) -> None:
    """After threshold learning, each edge certifies where peer answers meet ``p2p-max-error``:
    its clients score peer answers on the held-out items they escalate under the learned
    threshold, and the edge adds their evidence up (``PeerCoordinator.certify``)."""
    tau = run.progress.tau_global
    contents = {node: protocol.CheckPeers(tau, _prototypes_for(run, node)).pack() for node in run.cluster_of}
    replies = run.exchange("p2p", protocol.CHECK_PEERS, contents)
    evidence = {}
    for node, reply in replies.items():
        try:
            evidence[node] = (run.cluster_of[node], protocol.unpack_evidence(reply.content))
        except Exception as exc:  # noqa: BLE001 - a malformed reply only loses that client's evidence
            log(WARNING, "p2p: node %d sent malformed peer evidence (%s), left out", node, exc)
    run.peers.certify(evidence)
    for cluster, thresholds in run.peers.thresholds.items():
        evidence = run.peers.evidence[cluster]
        items, accepted, wrong = evidence.accepted(thresholds)
        log(INFO, "p2p: cluster %d certifies peer answers on %d of %d held-out items (%d wrong; %.1f if the threshold "
            "were raised instead) at p2p-max-error %.3f; tried: %s", cluster, accepted, items, wrong,
            evidence.wrong_if_threshold_raised(accepted), run.peers.max_error, run.peers.enabled(cluster))


def verify(run: Run, phase: str, asked: dict[int, Escalation], where: str) -> dict[int, Feedback]:
    """The LLM's verdicts on every client's escalated items, per client.

    All clients' items go to the oracle as one batch (model backends batch, servers pool).
    Items the oracle does not answer are left out of the feedback: clients keep the SLM
    draft for them (the fallback) and ask again in the next training round.
    """
    batches = {node: escalation.batch for node, escalation in asked.items()}
    merged = EscalationBatch.concat(list(batches.values()), run.oracle.num_classes)
    result = verify_safely(run.oracle, merged)
    traffic = run.oracle.traffic.drain()
    if traffic.requests:  # networked backends: the HTTP bytes to and from the model server
        run.ledger.add(phase, "cloud->oracle", traffic.sent, items=len(merged), messages=traffic.requests)
        run.ledger.add(phase, "oracle->cloud", traffic.received, messages=traffic.requests)
    if result.failed:
        log(WARNING, "%s: the oracle did not answer %d of %d items, they keep the SLM draft: %s",
            where, result.failed, len(merged), result.failure)
        run.oracle_failures.append({"phase": phase, "where": where, "items": result.failed, "of": len(merged), "cause": result.failure})
    feedback, start = {}, 0
    for node, batch in batches.items():
        part = result.take(start, start + len(batch))
        start += len(batch)
        feedback[node] = Feedback(batch.ids[part.answered], part.verdict)
    return feedback


def threshold_phase(run: Run) -> None:
    """Phase 3: escalate, verify, step tau locally, aggregate edge then cloud; refresh P2P."""
    p, last = run.progress, run.cfg.threshold_rounds
    if p.tau_global is None:
        p.tau_global = run.cfg.tau_init
    for rnd in range(p.threshold_done + 1, last + 1):
        round_started = time.monotonic()
        starts = {c: p.tau_edge.get(c, p.tau_global) for c in set(run.cluster_of.values())}
        round_config = run.aggregator.configure(THRESHOLD_UPDATE.name, rnd, {c: [np.array([t])] for c, t in starts.items()},
                                                [np.array([p.tau_global])], is_cloud_round(rnd, last, run.cfg.cloud_every))
        shared: dict[int, RecordDict] = {}  # per cluster: one instruction for the clients whose prototypes are current
        contents = {}
        for node, cluster in run.cluster_of.items():
            prototypes = _prototypes_for(run, node)
            if prototypes is None and cluster not in shared:
                shared[cluster] = Calibrate(starts[cluster], rnd, None, round_config[cluster]).pack()
            contents[node] = shared[cluster] if prototypes is None else Calibrate(starts[cluster], rnd, prototypes, round_config[cluster]).pack()
        asked = {n: Escalation.unpack(r.content) for n, r in run.exchange("threshold", protocol.CALIBRATE, contents, rnd).items()}
        feedback = verify(run, "threshold", asked, f"threshold round {rnd}")
        round_items = sum(len(e.batch) for e in asked.values())
        p.training_escalations += round_items
        for node, fb in feedback.items():  # what each client now holds, for a resumed run
            p.remember_feedback(run.partition_of[node], fb.ids, fb.verdict.beta.astype(np.float32), fb.verdict.final)
        replies = run.exchange("threshold", protocol.TRAIN_THRESHOLD, {n: fb.pack() for n, fb in feedback.items()}, rnd)
        if run.peers is not None:
            _refresh_peers(run, replies)
        updates = [protocol.node_update(n, r.content) for n, r in replies.items()]
        _remember_client_taus(run, updates)
        result = _aggregate(run, "threshold", rnd, updates, THRESHOLD_UPDATE, last)
        if result is None:
            log(WARNING, "threshold round %d: no updates, keeping tau = %.4f", rnd, p.tau_global)
        else:
            _record_threshold_round(run, rnd, result, round_items, len(replies), time.monotonic() - round_started)
        _warn_if_stuck(run, rnd)
        p.threshold_done = rnd
        run.save()


STUCK_ROUNDS = 3  # rounds without any movement of the thresholds before the run warns


def _warn_if_stuck(run: Run, rnd: int) -> None:
    """Say once when the thresholds have not moved from tau-init at all: the gradient vanished."""
    taus = [t for r in run.progress.rounds for t in (r["tau_global"], *r["tau_clusters"].values())]
    if rnd == STUCK_ROUNDS and len(run.progress.rounds) == STUCK_ROUNDS and all(abs(t - run.cfg.tau_init) < 1e-9 for t in taus):
        log(WARNING, "threshold round %d: no threshold has moved from tau-init = %s: the loss gradient vanishes (kappa = %s "
            "makes the smooth routing a step no item's uncertainty is near, or threshold-lr = %s is too small)",
            rnd, run.cfg.tau_init, run.cfg.kappa, run.cfg.threshold_lr)


def _record_threshold_round(run: Run, rnd: int, result: RoundResult, items: int, clients: int, seconds: float) -> None:
    """Keep the round's thresholds (global after a cloud round, per cluster always) and its history row."""
    p = run.progress
    # A strategy that moves or noises the mean (a server optimizer, differential privacy) can leave [0, 1];
    # a threshold there means the same as at its end (escalate nothing / everything).
    tau_of = lambda params: float(np.clip(params[0][0], 0.0, 1.0))  # noqa: E731
    taus = {c: tau_of(params) for c, params in result.aggregate.cluster_params.items()}
    if result.is_cloud_round:
        p.tau_global, p.tau_edge = tau_of(result.aggregate.global_params), {}
    else:  # a cluster without valid updates this round keeps its threshold
        p.tau_edge.update(taus)
    per_cluster = {str(c): t for c, t in taus.items()}
    p.rounds.append({"round": rnd, "tau_global": p.tau_global, "tau_clusters": per_cluster, "cloud": result.is_cloud_round,
                     "loss": result.metrics["loss"], "escalation_rate": result.metrics["escalation-rate"], "llm_items": items,
                     "clients": clients, "seconds": seconds})
    log(INFO, "threshold round %d: tau %.4f, clusters %s, loss %.4f, calibration escalation %.3f",
        rnd, p.tau_global, {c: round(t, 3) for c, t in per_cluster.items()}, result.metrics["loss"], result.metrics["escalation-rate"])


def _remember_client_taus(run: Run, updates: list[NodeUpdate]) -> None:
    """The threshold each client reports holding, for a resumed run (malformed ones are left to the aggregator)."""
    for u in updates:
        try:
            tau = float(np.asarray(u.params[0]).reshape(-1)[0])
        except (IndexError, TypeError, ValueError):
            continue
        if np.isfinite(tau):
            run.progress.remember_tau(run.partition_of[u.node], tau)


def policies(run: Run) -> dict[str, QueryPolicy]:
    """Every routing policy evaluated on the same test items: FedHLM (each client's own threshold,
    with and without peers) and the baselines."""
    tau, with_peers = run.progress.tau_global, run.peers is not None
    return {
        "fedhlm": QueryPolicy(tau, True, tau, with_peers),
        **({"fedhlm_no_p2p": QueryPolicy(tau, True, tau, False)} if with_peers else {}),
        "slm_only": QueryPolicy(NO_ESCALATION, False, tau, False),
        "static_threshold": QueryPolicy(run.cfg.static_threshold, False, tau, False),
        "cloud_only": QueryPolicy(ALL_ESCALATION, False, tau, False),
    }


def inference_phase(run: Run) -> dict[str, dict[int, dict[str, float]]]:
    """Phase 4: every routing policy on the same test items; per-client scores per policy."""
    evaluation: dict[str, dict[int, dict[str, float]]] = {}
    if run.peers is not None:
        certify_peers(run)
    for name, policy in policies(run).items():
        phase = f"inference:{name}"
        contents, tried = {}, {}
        for node, cluster in run.cluster_of.items():
            # Opportunistic collaboration: peers only where they pay, false reuse priced in.
            tried[node] = policy.try_peers and run.peers.enabled(cluster)
            node_policy = dataclasses.replace(policy, try_peers=tried[node])
            contents[node] = (RouteQueries(node_policy, _prototypes_for(run, node), run.peers.thresholds_of(cluster)) if tried[node]
                              else RouteQueries(node_policy)).pack()
        asked = {n: Escalation.unpack(r.content) for n, r in run.exchange(phase, protocol.ROUTE, contents).items()}
        feedback = verify(run, phase, asked, phase)
        scored = run.exchange(phase, protocol.SCORE, {n: fb.pack() for n, fb in feedback.items()})
        evaluation[name] = {
            node: {**{k: float(v) for k, v in r.content["metrics"].items()}, "tau": asked[node].tau, "try-p2p": float(tried[node])}
            for node, r in scored.items()
        }
    # Policies are compared on the same items: a node missing under any policy leaves them all.
    complete = set.intersection(*(set(per_node) for per_node in evaluation.values()))
    if any(set(per_node) != complete for per_node in evaluation.values()):
        log(WARNING, "inference: scoring the %d nodes that answered under every policy", len(complete))
    return {name: {n: row for n, row in per_node.items() if n in complete} for name, per_node in evaluation.items()}


"""An edge device: its typed state and the operations the ClientApp's handlers call.

``NodeState`` is the only reader and writer of ``context.state`` (Flower keeps it on the
node between messages; it never leaves the node). What it holds, and which operation
writes it:

==================  ========================================  ==============================
state               what                                      written by
==================  ========================================  ==============================
``encoder``         folder of the installed fine-tuned        ``install_encoder``
                    encoder (featurize with it)
``head_outputs``    the final head's class probabilities of   ``install_head``
                    every local item (with the label prior)
``tau``             the client's threshold tau_i              ``install_head`` (resume),
                                                              ``calibrate``, ``train_threshold``
``feedback``        the LLM's verdicts on calibration items   ``install_head`` (resume),
                                                              ``train_threshold``
``round_config``    what the threshold round's strategies     ``calibrate``
                    ask (FedProx's mu, a clipping norm)
``prototypes``      the cluster's P2P prototypes              ``calibrate``, ``check_peers``,
                                                              ``route``
``class_sums_sent`` the class sums last shared with the edge  ``train_threshold``
``tiers``           where each query went under the policy    ``route``, read by ``score``
                    being evaluated
``<model>-replica`` the model (``head``, ``encoder``) as the  ``train_head``, ``train_encoder``;
                    server last sent it, and its version      dropped by ``install_*``
``<model>-residual`` what the client has not sent yet of its  ``train_head``, ``train_encoder``;
                    updates (error feedback)                  dropped by ``install_*``
==================  ========================================  ==============================

The replicas and residuals are kept only while their model trains, sparse (the rows that are not
zero): a head with n-gram weights is megabytes that Flower's simulation moves with the node's
state on every message. Routing needs only the final head's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedhlm_app.app.protocol import (
    Calibrate,
    CheckPeers,
    ClientMemory,
    Escalation,
    Feedback,
    InstallHead,
    ModelUpdate,
    NodeInfo,
    RouteQueries,
    ThresholdReply,
    Train,
    pack_class_sums,
    pack_prototypes,
    unpack_class_sums,
    unpack_prototypes,
)
from fedhlm_app.config import RunConfig, run_config_of
from fedhlm_app.fl import attacks
from fedhlm_app.fl.compression import EXACT as EXACT_CODEC
from fedhlm_app.fl.compression import ErrorFeedback, Params, decode_model, encode_model
from fedhlm_app.fl.model_sync import ModelDelta, client_upload, whole
from fedhlm_app.fl.records import named_arrays, record_named_arrays, to_numpy
from fedhlm_app.fl.round_config import RoundConfig
from fedhlm_app.oracle.base import EscalationBatch
from fedhlm_app.paths import cache_dir
from fedhlm_app.routing import router
from fedhlm_app.routing.p2p import ClassSums, Prototypes, prototypes_changed
from fedhlm_app.routing.peer_bound import PeerEvidence
from fedhlm_app.routing.threshold import ThresholdConfig, local_update, loss, personalize
from fedhlm_app.slm.finetune import TuningConfig, get_tuner
from fedhlm_app.slm.head import HeadConfig, head_from_config
from fedhlm_app.slm.local_data import LocalData, LocalTexts, Placement, local_data, local_texts
from fedhlm_app.slm.predict import CALIBRATION_AS_QUERIES, HeadOutputs, head_outputs


class _Slot:
    """One typed entry of ``context.state``: packed into a Flower record on write, unpacked on read.
    Reading an absent entry gives ``default``, or, for an entry another operation must write first
    (``written_by``), a clear error."""

    def __init__(self, key: str, pack, unpack, default=None, written_by: str = "") -> None:
        self.key, self.pack, self.unpack, self.default, self.written_by = key, pack, unpack, default, written_by

    def __get__(self, node_state: NodeState, owner: type) -> Any:
        state = node_state.records
        if self.key in state:
            return self.unpack(state[self.key])
        if self.written_by:
            raise RuntimeError(f"node state '{self.key}' is missing: '{self.written_by}' must come first")
        return self.default

    def __set__(self, node_state: NodeState, value: Any) -> None:
        node_state.records[self.key] = self.pack(value)


def _pack_head_outputs(outputs: HeadOutputs) -> ArrayRecord:
    return named_arrays({**outputs.probs, ADAPTED_QUERIES: np.array(outputs.adapted_queries)})


def _unpack_head_outputs(record: ArrayRecord) -> HeadOutputs:
    arrays = record_named_arrays(record)
    adapted = float(arrays.pop(ADAPTED_QUERIES))
    return HeadOutputs(arrays, adapted)  # the splits, and CALIBRATION_AS_QUERIES where P2P is on


def _pack_memory(memory: ClientMemory) -> ArrayRecord:
    return named_arrays({"ids": memory.ids.astype(np.int64), "beta": memory.beta.astype(np.float32), "final": memory.final.astype(np.int64)})


def _unpack_memory(record: ArrayRecord) -> ClientMemory:
    arrays = record_named_arrays(record)
    return ClientMemory(arrays["ids"], arrays["beta"].astype(np.float64), arrays["final"], None)


ADAPTED_QUERIES = "adapted-queries"
NO_FEEDBACK = ClientMemory(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), None)


class NodeState:
    """Typed view of a node's ``context.state`` (see the table above)."""

    encoder = _Slot("encoder", lambda path: ConfigRecord({"path": path}), lambda r: str(r["path"]), default="")
    head_outputs = _Slot("head-outputs", _pack_head_outputs, _unpack_head_outputs, written_by="query.install_head")
    tau = _Slot("threshold", lambda tau: MetricRecord({"tau": float(tau)}), lambda r: float(r["tau"]))
    feedback = _Slot("feedback", _pack_memory, _unpack_memory, default=NO_FEEDBACK)  # its ``tau`` is left out
    round_config = _Slot("round-config", lambda c: ConfigRecord(c.as_config()), RoundConfig.of, default=RoundConfig())
    prototypes = _Slot("prototypes", pack_prototypes, unpack_prototypes)
    class_sums_sent = _Slot("p2p-sent", pack_class_sums, unpack_class_sums)
    tiers = _Slot("routing", lambda tiers: named_arrays({"tiers": tiers.astype(np.int8)}), lambda r: to_numpy(r["tiers"]),
                  written_by="query.route")

    def __init__(self, records: RecordDict) -> None:
        self.records = records

    def replica(self, model: str) -> tuple[Params | None, int | None]:
        """The replica of ``model`` this node holds and its version (None, None before the first round)."""
        key = f"{model}-replica"
        if key not in self.records:
            return None, None
        kept = ModelDelta.from_arrays(record_named_arrays(self.records[key]))
        return decode_model(kept.tables), kept.version

    def keep_replica(self, model: str, params: Params, version: int) -> None:
        self.records[f"{model}-replica"] = named_arrays(whole(params, version).to_arrays())

    def residual(self, model: str) -> Params | None:
        key = f"{model}-residual"
        return decode_model(ModelDelta.from_arrays(record_named_arrays(self.records[key])).tables) if key in self.records else None

    def keep_residual(self, model: str, residual: Params) -> None:
        self.records[f"{model}-residual"] = named_arrays(ModelDelta(0, 0, encode_model(residual, EXACT_CODEC)).to_arrays())

    def drop_training_state(self, model: str) -> None:
        """The model is installed: its replica and residual are not read again."""
        for key in (f"{model}-replica", f"{model}-residual"):
            if key in self.records:
                del self.records[key]


@dataclass
class Node:
    """One client's operations, each called by one ClientApp handler."""

    cfg: RunConfig
    placement: Placement
    state: NodeState

    @staticmethod
    def of(context: Context) -> Node:
        cfg = run_config_of(context.run_config)
        return Node(cfg, Placement.of(context.node_config, cfg), NodeState(context.state))

    @property
    def texts(self) -> LocalTexts:
        return local_texts(self.cfg, self.placement)

    @property
    def data(self) -> LocalData:
        """The local items, featurized by the installed encoder (the configured one until then)."""
        return local_data(self.cfg, self.placement, self.state.encoder)

    def _rng(self, server_round: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, self.placement.partition_id, server_round])

    def _routing(self, split: str) -> router.Routing:
        return router.Routing.of(self.state.head_outputs.probs[split], self.cfg.uncertainty)

    # ---- setup and training ------------------------------------------------------------------

    def info(self, featurized: bool) -> NodeInfo:
        """Placement and sizes (and, once ``featurized``, the embedding width)."""
        texts = self.texts
        counts = [int(c) for c in texts.own_label_counts()] if self.cfg.local_label_prior else []
        return NodeInfo(self.placement.cluster_id, self.placement.partition_id, len(texts.fit), len(texts.calibration),
                        len(texts.test), texts.num_classes, self.data.dim if featurized else 0, counts)

    def setup(self) -> NodeInfo:
        """Load the local data and featurize it, unless the encoder is fine-tuned first."""
        return self.info(featurized=not self.cfg.encoder_rounds)

    def train_encoder(self, instruction: Train) -> ModelUpdate:
        """Fine-tune the encoder's top layers on the local fit split, from the replica the instruction moves."""
        cfg, texts = self.cfg, self.texts
        asked = RoundConfig.of(instruction.config)
        start = self._start("encoder", instruction.model)
        tuner = get_tuner(cfg.slm_model, cfg.encoder_layers, texts.num_classes).set_arrays(start)
        tuning = TuningConfig(cfg.encoder_steps, cfg.encoder_batch_size, cfg.encoder_lr, cfg.max_length, asked.proximal_mu)
        train_loss = tuner.train(texts.fit.texts, texts.fit.labels, tuning, self._rng(instruction.server_round))
        metrics = {"num-examples": len(texts.fit), "train-loss": train_loss}
        return ModelUpdate(self._upload("encoder", asked.clipped(tuner.get_arrays(), start, metrics), start, instruction.model), metrics)

    def install_encoder(self, model: ModelDelta) -> NodeInfo:
        """Install the fine-tuned encoder and featurize the local data with it."""
        params = self._start("encoder", model)
        self.state.drop_training_state("encoder")
        tuner = get_tuner(self.cfg.slm_model, self.cfg.encoder_layers, self.texts.num_classes).set_arrays(params)
        self.state.encoder = str(tuner.install(cache_dir(self.cfg.cache_dir)))
        return self.info(featurized=True)

    def train_head(self, instruction: Train) -> ModelUpdate:
        """Fit the head on the local fit split, starting from the replica the instruction moves."""
        cfg, data, asked = self.cfg, self.data, RoundConfig.of(instruction.config)
        start = self._start("head", instruction.model)
        head = head_from_config(cfg, data.dim, data.num_classes).set_params(start)
        head.fit(data.fit.inputs, data.fit.y, HeadConfig(cfg.head_epochs, cfg.head_lr, l2=cfg.head_l2, proximal_mu=asked.proximal_mu),
                 self._rng(instruction.server_round))
        accuracy = float(np.mean(head.predict_proba(data.fit.inputs).argmax(1) == data.fit.y)) if len(data.fit) else 0.0
        metrics = {"num-examples": len(data.fit), "train-loss": head.log_loss(data.fit.inputs, data.fit.y), "train-accuracy": accuracy}
        return ModelUpdate(self._upload("head", asked.clipped(head.get_params(), start, metrics), start, instruction.model), metrics)

    def _start(self, model: str, message: ModelDelta) -> Params:
        """The model a round starts from: the node's replica moved by the server's message (kept, when
        training is compressed, for the next message to move)."""
        params = message.apply(*self.state.replica(model))
        if self.cfg.broadcast_codec is not None:
            self.state.keep_replica(model, params, message.version)
        return params

    def _upload(self, model: str, trained: Params, start: Params, message: ModelDelta) -> ModelDelta:
        """What leaves the node for its trained model (from a hostile node, a poisoned one): a delta
        from ``start``, compressed with the node's error feedback, or the whole model."""
        if self.placement.hostile:
            trained = attacks.poisoned_model(trained, start)
        feedback = ErrorFeedback(self.state.residual(model))
        update = client_upload(trained, start, message.version, self.cfg.upload_codec, feedback)
        if feedback.residual is not None:
            self.state.keep_residual(model, feedback.residual)
        return update

    def install_head(self, instruction: InstallHead) -> None:
        """Keep the final head's outputs on every local item (and a resumed client's memory)."""
        data = self.data
        params = self._start("head", instruction.model)
        self.state.drop_training_state("head")
        head = head_from_config(self.cfg, data.dim, data.num_classes).set_params(params)
        pooled = instruction.pooled_label_counts
        own = self.texts.own_label_counts() if pooled is not None else None
        self.state.head_outputs = head_outputs(head, data, own, pooled, calibration_as_queries=self.cfg.p2p)
        memory = instruction.memory
        if memory is not None:
            if len(memory.ids):
                self.state.feedback = memory
            if memory.tau is not None:
                self.state.tau = memory.tau

    # ---- threshold learning ------------------------------------------------------------------

    def _starting_tau(self, reference: float) -> float:
        """tau_i moved towards the server's reference (the reference itself on first contact)."""
        current = self.state.tau
        return reference if current is None else personalize(current, reference, self.cfg.personalization_alpha)

    def _take_prototypes(self, prototypes: Prototypes | None) -> None:
        if prototypes is not None:  # refreshed by the edge: the node's token cache
            self.state.prototypes = prototypes

    def calibrate(self, instruction: Calibrate) -> Escalation:
        """Move tau_i towards the reference, then send the escalated calibration items plus an
        exploration band below tau, skipping those whose verdict the client already has (the
        head is fixed, so the LLM's verdict on an item does not change)."""
        self._take_prototypes(instruction.prototypes)
        tau = self._starting_tau(instruction.tau_reference)
        self.state.tau = tau
        self.state.round_config = RoundConfig.of(instruction.config)
        routing = self._routing("calibration")
        ids = router.calibration_requests(routing.uncertainty, tau, self.cfg.exploration_band, self.state.feedback.ids)
        return Escalation(self._batch(self.data.calibration.texts, routing, ids), len(routing.drafts), tau)

    def train_threshold(self, feedback: Feedback) -> ThresholdReply:
        """Merge the LLM's verdicts, step tau_i, share the class sums of the fit items until the edge has them."""
        cfg, data = self.cfg, self.data
        calibration = self._routing("calibration")
        known = self.state.feedback
        memory = ClientMemory(np.concatenate([known.ids, feedback.ids]).astype(np.int64),
                              np.concatenate([known.beta, feedback.verdict.beta]),
                              np.concatenate([known.final, feedback.verdict.final]).astype(np.int64), None)
        self.state.feedback = memory
        tau = self.state.tau
        metrics: dict[str, float] = {"num-examples": len(data.calibration)}
        asked = self.state.round_config
        tcfg = ThresholdConfig(kappa=cfg.kappa, lam=cfg.lambda_, lr=cfg.threshold_lr, local_steps=cfg.threshold_local_steps,
                               proximal_mu=asked.proximal_mu)
        n = max(len(data.calibration), 1)
        h_known = calibration.uncertainty[memory.ids]
        metrics["loss-before"] = loss(tau, h_known, memory.beta, tcfg.lam, tcfg.kappa, n)
        start = tau
        tau = float(asked.clipped([np.array([local_update(tau, h_known, memory.beta, tcfg, n)])], [np.array([start])], metrics)[0][0])
        self.state.tau = tau
        h = calibration.uncertainty
        metrics.update({"loss": loss(tau, h_known, memory.beta, tcfg.lam, tcfg.kappa, n),
                        "escalation-rate": float(np.mean(h > tau)) if len(h) else 0.0, "feedback-items": len(memory.ids)})
        sent = attacks.POISONED_TAU if self.placement.hostile else tau
        return ThresholdReply(sent, metrics, self._moved_class_sums() if cfg.p2p else None)

    def _moved_class_sums(self) -> ClassSums | None:
        """The class sums of this client's labelled fit items, when they differ from what the edge
        holds (the edge keeps the latest). Calibration items never enter them: they are the held-out
        items the error of peer answers is estimated on."""
        data = self.data
        # compare what the edge would hold: the sums as they travel (float16)
        sums = unpack_class_sums(pack_class_sums(ClassSums.of(data.fit.x, data.fit.y, data.num_classes)))
        previous = self.state.class_sums_sent
        if not prototypes_changed(previous.prototypes() if previous is not None else None, sums.prototypes()):
            return None
        self.state.class_sums_sent = sums
        return sums

    def check_peers(self, instruction: CheckPeers) -> PeerEvidence:
        """How peers would answer the held-out items this client escalates under its threshold: the
        calibration items above it whose LLM verdict it holds, routed as queries are (re-weighted to
        the estimated label mix), scored against the cluster's prototypes."""
        self._take_prototypes(instruction.prototypes)
        prototypes, memory = self.state.prototypes, self.state.feedback
        calibration = self._routing(CALIBRATION_AS_QUERIES)
        if prototypes is None:
            return PeerEvidence.of(np.zeros(0), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0), calibration.probs.shape[1])
        tau = self._starting_tau(instruction.tau_reference)
        return router.peer_evidence(calibration, self.data.calibration.x, tau, prototypes, memory.ids, memory.final)

    # ---- inference ---------------------------------------------------------------------------

    def route(self, instruction: RouteQueries) -> Escalation:
        """Route the queries under the policy; send the ones that go to the LLM."""
        self._take_prototypes(instruction.prototypes)
        policy = instruction.policy
        tau = self._starting_tau(policy.tau_reference) if policy.own_threshold else policy.tau
        routing = self._routing("test")
        thresholds = instruction.peer_thresholds if policy.try_peers else None
        tiers = router.query_tiers(routing, self.data.test.x, tau, self.state.prototypes, thresholds)
        self.state.tiers = tiers
        return Escalation(self._batch(self.data.test.texts, routing, np.flatnonzero(tiers == router.LLM)), len(tiers), tau)

    def score(self, feedback: Feedback) -> dict[str, float]:
        """Score the answers of the last routed policy against the labels."""
        routing = self._routing("test")
        v = feedback.verdict
        counts = router.score(self.state.tiers, routing.drafts, feedback.ids, v.final, v.accepted, self.data.test.y)
        return {**counts, ADAPTED_QUERIES: self.state.head_outputs.adapted_queries}

    @staticmethod
    def _batch(texts: list[str], routing: router.Routing, ids: np.ndarray) -> EscalationBatch:
        return EscalationBatch(ids=ids, texts=[texts[i] for i in ids], probs=routing.probs[ids], drafts=routing.drafts[ids])


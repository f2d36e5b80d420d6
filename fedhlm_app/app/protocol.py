"""FedHLM's messages: their types, their content, and how each one is packed into Flower records.

Every exchange is started by the ServerApp; each message type has one handler in the
ClientApp (``client_app``) and one packed form per direction, defined here and nowhere else:

=========================  ===========================================  =============================================
message type               instruction (server -> client)               reply (client -> server)
=========================  ===========================================  =============================================
``query.setup``            (empty)                                      ``NodeInfo``
``train.encoder``          ``Train`` (encoder layers, round)            ``ModelUpdate`` (layers, metrics)
``query.install_encoder``  the final encoder layers                     ``NodeInfo`` (featurized with them)
``train.head``             ``Train`` (head, round)                      ``ModelUpdate`` (head, metrics)
``query.install_head``     ``InstallHead`` (head, pooled label counts,  (empty)
                           a resumed client's ``ClientMemory``)
``query.calibrate``        ``Calibrate`` (tau reference, round,         ``Escalation`` (items for the LLM)
                           refreshed P2P prototypes)
``train.threshold``        ``Feedback`` (the LLM's verdicts)            ``ThresholdReply`` (tau, metrics, class sums)
``query.check_peers``      ``CheckPeers`` (tau reference, refreshed     ``PeerEvidence`` (held-out peer outcomes)
                           P2P prototypes)
``query.route``            ``RouteQueries`` (a routing policy, the      ``Escalation``
                           certified peer thresholds, refreshed
                           P2P prototypes)
``evaluate.score``         ``Feedback``                                 per-client counts (``router.score``)
=========================  ===========================================  =============================================

Models travel as ``ModelDelta`` (``fedhlm_app.fl.model_sync``): what changed since the replica the
client holds, compressed, or the whole model. ``bookings`` says on which link (and phase) each part of a message is counted in the
ledger, from its serialized size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedhlm_app.fl.model_sync import ModelDelta
from fedhlm_app.fl.records import arrays_record, named_arrays, record_arrays, record_named_arrays, to_numpy
from fedhlm_app.fl.tiers import NodeUpdate
from fedhlm_app.oracle.base import EscalationBatch
from fedhlm_app.routing.p2p import ClassSums, Prototypes
from fedhlm_app.routing.peer_bound import NUM_BINS, RANK_BINS, PeerEvidence
from fedhlm_app.routing.speculative import Verdict

SETUP = "query.setup"
TRAIN_ENCODER = "train.encoder"
INSTALL_ENCODER = "query.install_encoder"
TRAIN_HEAD = "train.head"
INSTALL_HEAD = "query.install_head"
CALIBRATE = "query.calibrate"
TRAIN_THRESHOLD = "train.threshold"
CHECK_PEERS = "query.check_peers"
ROUTE = "query.route"
SCORE = "evaluate.score"


# ---- arrays -----------------------------------------------------------------------------------

def serialized_size(content: RecordDict) -> int:
    """Bytes of the content as Flower serializes it on the wire (protobuf)."""
    return recorddict_to_proto(content).ByteSize()


@lru_cache(maxsize=64)
def _arrays_size(signature: tuple[tuple[tuple[int, ...], str], ...], with_weight: bool) -> int:
    content = RecordDict({"arrays": arrays_record([np.zeros(shape, dtype=dtype) for shape, dtype in signature])})
    if with_weight:
        content["metrics"] = MetricRecord({"num-examples": 1.0})
    return serialized_size(content)


def arrays_size(params: list[np.ndarray], with_weight: bool = False) -> int:
    """Serialized bytes of arrays sent whole (``{"arrays"}``, plus the sample count when ``with_weight``):
    the size depends only on their shapes and types, so it is computed once per signature."""
    return _arrays_size(tuple((tuple(p.shape), str(p.dtype)) for p in params), with_weight)


def model_message_size(model: ModelDelta, with_weight: bool = False) -> int:
    """Serialized bytes of a model message between tiers (an edge's upload carries its sample count too)."""
    content = RecordDict({"model": pack_model(model)})
    if with_weight:
        content["metrics"] = MetricRecord({"num-examples": 1.0})
    return serialized_size(content)


# ---- typed messages ---------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeInfo:
    """What the server learns of a client: placement, sizes, classes, embedding width, label counts."""

    cluster_id: int
    partition_id: int
    n_fit: int
    n_calibration: int
    n_test: int
    num_classes: int
    dim: int = 0  # 0: not featurized yet (the encoder is fine-tuned first)
    label_counts: list[int] = field(default_factory=list)  # empty unless local-label-prior

    def pack(self) -> RecordDict:
        info = {"cluster-id": self.cluster_id, "partition-id": self.partition_id, "n-fit": self.n_fit,
                "n-calibration": self.n_calibration, "n-test": self.n_test, "num-classes": self.num_classes, "dim": self.dim}
        if self.label_counts:
            info["label-counts"] = list(self.label_counts)
        return RecordDict({"info": ConfigRecord(info)})

    @staticmethod
    def unpack(content: RecordDict) -> NodeInfo:
        info = content["info"]
        return NodeInfo(int(info["cluster-id"]), int(info["partition-id"]), int(info["n-fit"]), int(info["n-calibration"]),
                        int(info["n-test"]), int(info["num-classes"]), int(info["dim"]),
                        [int(c) for c in info["label-counts"]] if "label-counts" in info else [])


def pack_model(model: ModelDelta) -> ArrayRecord:
    """A model message (``ModelDelta``: a compressed delta from the replica, or a whole model) as one record."""
    return named_arrays(model.to_arrays())


def unpack_model(record: ArrayRecord) -> ModelDelta:
    return ModelDelta.from_arrays(record_named_arrays(record))


@dataclass(frozen=True)
class Train:
    """A training round's instruction: the model to start from and what the round's strategies ask of the client."""

    model: ModelDelta
    server_round: int
    config: dict[str, Any] = field(default_factory=dict)  # from the strategies' configure_train (``RoundConfig``)

    def pack(self) -> RecordDict:
        return RecordDict({"model": pack_model(self.model), "config": ConfigRecord({**self.config, "server-round": self.server_round})})

    @staticmethod
    def unpack(content: RecordDict) -> Train:
        config = dict(content["config"])
        return Train(unpack_model(content["model"]), int(config.pop("server-round")), config)


@dataclass(frozen=True)
class ModelUpdate:
    """A client's trained model, as a compressed delta (or whole), and its metrics (``num-examples`` weighs it)."""

    model: ModelDelta
    metrics: dict[str, float]

    def pack(self) -> RecordDict:
        return RecordDict({"model": pack_model(self.model), "metrics": MetricRecord(self.metrics)})


@dataclass(frozen=True)
class ClientUpdate:
    """A client's update of a small model sent whole (its threshold): its arrays and its metrics."""

    params: list[np.ndarray]
    metrics: dict[str, float]

    def pack(self) -> RecordDict:
        return RecordDict({"arrays": arrays_record(self.params), "metrics": MetricRecord(self.metrics)})


def node_update(node: int, content: RecordDict, rebuild: Callable[[ModelDelta], list[np.ndarray]] | None = None) -> NodeUpdate:
    """A training reply decoded once: a ``ModelUpdate`` (its model rebuilt by ``rebuild`` from what the
    node's cluster holds) or a ``ClientUpdate``; a malformed one carries its problem for the aggregator to record."""
    try:
        if rebuild is not None:
            params = rebuild(unpack_model(content["model"]))
        else:
            params = record_arrays(content["arrays"])
        metrics = dict(content["metrics"])
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a malformed reply
        return NodeUpdate(node, [], {}, f"malformed reply ({type(exc).__name__}: {exc})")
    return NodeUpdate(node, params, metrics)


@dataclass(frozen=True)
class ClientMemory:
    """What a client had learned before a crash, for a resumed run: the LLM's verdicts on its
    calibration items and its threshold."""

    ids: np.ndarray
    beta: np.ndarray
    final: np.ndarray
    tau: float | None

    @staticmethod
    def of(held: Mapping[str, np.ndarray]) -> ClientMemory:
        """From arrays named ``ids``, ``beta``, ``final`` and ``tau`` (each may be missing), as a
        checkpoint keeps them (``Progress.clients``) and as ``InstallHead`` carries them."""
        empty = np.zeros(0)
        return ClientMemory(held.get("ids", empty.astype(np.int64)), held.get("beta", empty), held.get("final", empty.astype(np.int64)),
                            float(held["tau"][0]) if "tau" in held else None)


@dataclass(frozen=True)
class InstallHead:
    """The final head (a delta from the client's replica), the pooled label counts (with the local label
    prior) and, on a resumed run, the client's memory."""

    model: ModelDelta
    pooled_label_counts: np.ndarray | None
    memory: ClientMemory | None

    def pack(self) -> RecordDict:
        content = RecordDict({"model": pack_model(self.model)})
        if self.pooled_label_counts is not None:
            content["label-counts"] = named_arrays({"pooled": self.pooled_label_counts})
        if self.memory is not None:
            m = self.memory
            saved = {"ids": m.ids, "beta": m.beta, "final": m.final} if len(m.ids) else {}
            if m.tau is not None:
                saved["tau"] = np.array([m.tau])
            content["restore"] = named_arrays(saved)
        return content

    @staticmethod
    def unpack(content: RecordDict) -> InstallHead:
        pooled = to_numpy(content["label-counts"]["pooled"]) if "label-counts" in content else None
        memory = ClientMemory.of(record_named_arrays(content["restore"])) if "restore" in content else None
        return InstallHead(unpack_model(content["model"]), pooled, memory)


def pack_prototypes(prototypes: Prototypes) -> ArrayRecord:
    """A cluster's class prototypes and its neighbours' (float16: cosines need no more)."""
    own, neighbours = prototypes.own, prototypes.neighbours
    stacked = np.stack(neighbours) if neighbours else np.zeros((0, *own.shape))
    return named_arrays({"own": own.astype(np.float16), "neighbours": stacked.astype(np.float16)})


def unpack_prototypes(record: ArrayRecord) -> Prototypes:
    return Prototypes(to_numpy(record["own"]).astype(np.float64), [n.astype(np.float64) for n in to_numpy(record["neighbours"])])


def pack_class_sums(sums: ClassSums) -> ArrayRecord:
    """A client's per-class embedding sums (float16 halves the bytes; 1e-3 relative is plenty)."""
    return named_arrays({"sums": sums.sums.astype(np.float16), "counts": sums.counts.astype(np.float32)})


def unpack_class_sums(record: ArrayRecord) -> ClassSums:
    return ClassSums(to_numpy(record["sums"]).astype(np.float64), to_numpy(record["counts"]).astype(np.float64))


def _with_prototypes(content: RecordDict, prototypes: Prototypes | None) -> RecordDict:
    if prototypes is not None:
        content["prototypes"] = pack_prototypes(prototypes)
    return content


def _prototypes_of(content: RecordDict) -> Prototypes | None:
    return unpack_prototypes(content["prototypes"]) if "prototypes" in content else None


@dataclass(frozen=True)
class Calibrate:
    """Threshold round: start from the reference tau and send the calibration items for feedback.
    ``prototypes``: the cluster's refreshed P2P prototypes, only when they changed."""

    tau_reference: float
    server_round: int
    prototypes: Prototypes | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the round's strategy config, for the threshold step

    def pack(self) -> RecordDict:
        config = ConfigRecord({**self.config, "tau-reference": self.tau_reference, "server-round": self.server_round})
        return _with_prototypes(RecordDict({"config": config}), self.prototypes)

    @staticmethod
    def unpack(content: RecordDict) -> Calibrate:
        conf = dict(content["config"])
        tau, rnd = float(conf.pop("tau-reference")), int(conf.pop("server-round"))
        return Calibrate(tau, rnd, _prototypes_of(content), conf)


@dataclass(frozen=True)
class QueryPolicy:
    """A routing policy for the queries: a threshold (or each client's own), peers tried first or not."""

    tau: float
    own_threshold: bool
    tau_reference: float  # where a client's own threshold moves from
    try_peers: bool


@dataclass(frozen=True)
class CheckPeers:
    """After threshold learning: score peer answers on the held-out items escalated under the
    reference tau. ``prototypes``: the cluster's refreshed P2P prototypes, only when they changed."""

    tau_reference: float
    prototypes: Prototypes | None = None

    def pack(self) -> RecordDict:
        return _with_prototypes(RecordDict({"config": ConfigRecord({"tau-reference": self.tau_reference})}), self.prototypes)

    @staticmethod
    def unpack(content: RecordDict) -> CheckPeers:
        return CheckPeers(float(content["config"]["tau-reference"]), _prototypes_of(content))


def pack_evidence(evidence: PeerEvidence) -> RecordDict:
    counts = {"items": evidence.items, "wrong": evidence.wrong, "rank-items": evidence.rank_items, "rank-wrong": evidence.rank_wrong}
    return RecordDict({"evidence": named_arrays({name: a.astype(np.int32) for name, a in counts.items()})})


def unpack_evidence(content: RecordDict) -> PeerEvidence:
    """A client's peer evidence, checked: counts of the right shapes, never negative, never more wrong
    than items, the same items by score and by rank."""
    arrays = {name: a.astype(np.int64) for name, a in record_named_arrays(content["evidence"]).items()}
    items, wrong = arrays.get("items", np.zeros(0)), arrays.get("wrong", np.zeros(0))
    rank_items, rank_wrong = arrays.get("rank-items", np.zeros(0)), arrays.get("rank-wrong", np.zeros(0))
    if (items.ndim != 2 or items.shape[1] != NUM_BINS or wrong.shape != items.shape or rank_items.shape != (RANK_BINS,)
            or rank_wrong.shape != (RANK_BINS,) or min(wrong.min(initial=0), rank_wrong.min(initial=0)) < 0
            or (wrong > items).any() or (rank_wrong > rank_items).any()
            or items.sum() != rank_items.sum() or wrong.sum() != rank_wrong.sum()):
        raise ValueError(f"peer evidence must be (classes, {NUM_BINS}) and ({RANK_BINS},) count arrays of the same items "
                         "with 0 <= wrong <= items")
    return PeerEvidence(items, wrong, rank_items, rank_wrong)


@dataclass(frozen=True)
class RouteQueries:
    """Inference: route the test items under ``policy`` and send the escalated ones. Where the policy
    tries peers, ``peer_thresholds`` are the cluster's certified thresholds per draft class."""

    policy: QueryPolicy
    prototypes: Prototypes | None = None
    peer_thresholds: np.ndarray | None = None

    def pack(self) -> RecordDict:
        p = self.policy
        config = ConfigRecord({"tau": float(p.tau), "own-threshold": p.own_threshold, "tau-reference": float(p.tau_reference),
                               "try-p2p": p.try_peers})
        content = _with_prototypes(RecordDict({"config": config}), self.prototypes)
        if self.peer_thresholds is not None:
            # float64: a client must draw exactly the line the edge certified (one number per class)
            content["peer-thresholds"] = named_arrays({"thresholds": np.asarray(self.peer_thresholds, dtype=np.float64)})
        return content

    @staticmethod
    def unpack(content: RecordDict) -> RouteQueries:
        c = content["config"]
        policy = QueryPolicy(float(c["tau"]), bool(c["own-threshold"]), float(c["tau-reference"]), bool(c["try-p2p"]))
        thresholds = to_numpy(content["peer-thresholds"]["thresholds"]) if "peer-thresholds" in content else None
        return RouteQueries(policy, _prototypes_of(content), thresholds)


@dataclass(frozen=True)
class Escalation:
    """Items a client sends to the LLM, with how many it routed and the threshold it used."""

    batch: EscalationBatch
    num_items: int
    tau: float

    def pack(self) -> RecordDict:
        b = self.batch
        arrays = named_arrays({"ids": np.asarray(b.ids, dtype=np.int64), "probs": np.asarray(b.probs, dtype=np.float32),
                               "drafts": np.asarray(b.drafts, dtype=np.int64)})
        metrics = MetricRecord({"num-items": self.num_items, "num-escalated": len(b), "tau": float(self.tau)})
        return RecordDict({"escalation": arrays, "texts": ConfigRecord({"texts": list(b.texts)}), "metrics": metrics})

    @staticmethod
    def unpack(content: RecordDict) -> Escalation:
        arrays = content["escalation"]
        texts = content["texts"]["texts"] if "texts" in content["texts"] else []
        batch = EscalationBatch(ids=to_numpy(arrays["ids"]), texts=list(texts), probs=to_numpy(arrays["probs"]),
                                drafts=to_numpy(arrays["drafts"]))
        return Escalation(batch, int(content["metrics"]["num-items"]), float(content["metrics"]["tau"]))


@dataclass(frozen=True)
class Feedback:
    """The LLM's verdicts on the items a client escalated (the ones it answered)."""

    ids: np.ndarray
    verdict: Verdict

    def pack(self) -> RecordDict:
        v = self.verdict
        return RecordDict({"feedback": named_arrays({
            "ids": np.asarray(self.ids, dtype=np.int64), "beta": np.asarray(v.beta, dtype=np.float32),
            "accepted": np.asarray(v.accepted, dtype=np.bool_), "final": np.asarray(v.final, dtype=np.int64),
        })})

    @staticmethod
    def unpack(content: RecordDict) -> Feedback:
        arrays = record_named_arrays(content["feedback"])
        return Feedback(arrays["ids"], Verdict(beta=arrays["beta"].astype(np.float64), accepted=arrays["accepted"].astype(bool),
                                               final=arrays["final"]))


@dataclass(frozen=True)
class ThresholdReply:
    """A client's threshold after its local steps, its metrics, and its class sums when they moved its prototypes."""

    tau: float
    metrics: dict[str, float]
    class_sums: ClassSums | None = None

    def pack(self) -> RecordDict:
        content = ClientUpdate([np.array([self.tau], dtype=np.float64)], self.metrics).pack()
        if self.class_sums is not None:
            content["p2p"] = pack_class_sums(self.class_sums)
        return content

    @staticmethod
    def class_sums_of(content: RecordDict) -> ClassSums | None:
        return unpack_class_sums(content["p2p"]) if "p2p" in content else None


def metrics_reply(metrics: dict[str, float]) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(metrics)})


# ---- byte booking -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Booking:
    """Bytes of one part of a message, on a link, in a phase (None: the message's own phase)."""

    link: str
    nbytes: int
    items: int = 0
    phase: str | None = None


def _part_size(content: RecordDict, key: str) -> int:
    """Serialized bytes of one record of a message's content (0 when absent)."""
    return serialized_size(RecordDict({key: content[key]})) if key in content else 0


def _items(content: RecordDict, record: str) -> int:
    """How many items a record carries, from the metadata of its ``ids`` array (no decoding)."""
    return int(content[record]["ids"].shape[0]) if record in content else 0


def instruction_bookings(content: RecordDict) -> list[Booking]:
    """An instruction: the LLM's verdicts travel on the LLM link, P2P prototypes and peer thresholds
    are P2P traffic, the rest is control traffic of the message's phase."""
    items = _items(content, "feedback")
    feedback = _part_size(content, "feedback") if items else 0
    peers = _part_size(content, "prototypes") + _part_size(content, "peer-thresholds")
    out = [Booking("edge->client", serialized_size(content) - feedback - peers)]
    if items:
        out.append(Booking("llm->client", feedback, items))
    if peers:
        out.append(Booking("edge->client", peers, phase="p2p"))
    return out


def reply_bookings(content: RecordDict) -> list[Booking]:
    """A reply: an escalation with items goes to the LLM; class sums are P2P traffic; the rest is control."""
    sums = _part_size(content, "p2p")
    items = _items(content, "escalation")
    out = [Booking("client->llm" if items else "client->edge", serialized_size(content) - sums, items)]
    if sums:
        out.append(Booking("client->edge", sums, phase="p2p"))
    return out


def prototypes_size(prototypes: Prototypes) -> int:
    """Serialized bytes of prototypes as a client receives them."""
    return _part_size(RecordDict({"prototypes": pack_prototypes(prototypes)}), "prototypes")

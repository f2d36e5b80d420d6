"""fedhlm: the ClientApp (an edge device hosting the SLM).

Message types it answers (all initiated by the ServerApp):

- ``query.setup``: load the local partition, featurize it (cached), report the
  cluster and sizes;
- ``train.encoder`` / ``query.encoder`` (with ``encoder-rounds`` > 0): fine-tune the
  encoder's top layers from the global weights; install the result and featurize with it;
- ``train.head``: fit the classification head from the global weights;
- ``query.escalate``: route the calibration or test items with the current
  threshold and send the uncertain ones (text, distribution, draft) to the LLM;
- ``train.threshold``: take local gradient steps on tau with the LLM feedback;
- ``evaluate.hlm``: combine local, peer (P2P) and LLM answers and score them.

Node-local state (the final head's outputs on the local items, the threshold tau_i,
cached LLM feedback, the cluster's P2P prototypes, the last routing, the installed
encoder) lives in ``context.state`` and never leaves the node except as the updates
above: encoder layers, head weights, thresholds, per-class embedding sums for the
prototypes, and the escalated items.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedhlm_app.data import datasets as data_mod
from fedhlm_app.config import validate
from fedhlm_app.slm.features import EncoderSpec, featurize, resolve_cache_dir
from fedhlm_app.slm.finetune import TuningConfig, get_tuner
from fedhlm_app.slm.head import HeadConfig, HeadInputs, SoftmaxHead, head_from_config, unit_rows
from fedhlm_app.slm.label_prior import label_counts, likelier_prior, prior_of, shift_prior
from fedhlm_app.slm.ngrams import NgramBags
from fedhlm_app.oracle.base import EscalationBatch
from fedhlm_app.routing.p2p import ClassSums, prototypes_changed, resolve
from fedhlm_app.data.partition import calibration_split, cluster_of_partition, partition_clients
from fedhlm_app.app.protocol import (
    arrays_record, pack_class_sums, pack_escalation, record_arrays, to_array, to_numpy, unpack_class_sums, unpack_feedback,
    unpack_prototypes,
)
from fedhlm_app.routing.threshold import ThresholdConfig, exploration_mask, local_update, loss, personalize
from fedhlm_app.slm.uncertainty import get_measure

app = ClientApp()


@dataclass(frozen=True)
class LocalSplit:
    """A client's items: unit embeddings, labels, texts and (optionally) hashed n-gram bags."""

    x: np.ndarray
    y: np.ndarray
    texts: list[str]
    bags: NgramBags | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def inputs(self) -> HeadInputs:
        """What the head reads."""
        return HeadInputs(self.x, self.bags)


@dataclass(frozen=True)
class LocalData:
    fit: LocalSplit
    calibration: LocalSplit
    test: LocalSplit
    num_classes: int


# ---- data ---------------------------------------------------------------------------------------


def run_config(context: Context) -> dict[str, Any]:
    """The validated run config (validated once per process and config, not per message)."""
    return dict(_validated(tuple(sorted(context.run_config.items()))))


@lru_cache(maxsize=8)
def _validated(items: tuple) -> tuple:
    return tuple(validate(dict(items)).items())


def _data_args(cfg: dict[str, Any]) -> tuple:
    return (cfg["data-source"], cfg["hub-dataset"], cfg["data-dir"], cfg["train-file"], cfg["test-file"])


@lru_cache(maxsize=2)
def _dataset(args: tuple, max_train: int, max_test: int, seed: int) -> data_mod.Dataset:
    return data_mod.load_dataset(*args).truncated(max_train, max_test, seed)


def load_server_dataset(cfg: dict[str, Any]) -> data_mod.Dataset:
    """The dataset as configured (shared with the ServerApp's labels oracle)."""
    return _dataset(_data_args(cfg), cfg["max-train-items"], cfg["max-test-items"], cfg["seed"])


@lru_cache(maxsize=2)
def _partitions(args: tuple, max_train: int, max_test: int, seed: int, n: int, alpha: float, cal: float, min_size: int,
                test_mix: str):
    ds = _dataset(args, max_train, max_test, seed)
    return partition_clients(ds.train.labels, ds.test.labels, n, alpha, seed, cal, min_size, test_mix)


def _encode(split: data_mod.Split, cfg: dict[str, Any], label: str) -> LocalSplit:
    spec = EncoderSpec(cfg["slm-model"], cfg["max-length"], cfg["precision"], cfg["batch-tokens"])
    x = featurize(split.texts, spec, resolve_cache_dir(cfg["cache-dir"]), progress=label)
    bags = NgramBags.of(split.texts, cfg["ngram-buckets"]) if cfg["ngram-buckets"] else None
    return LocalSplit(unit_rows(x), split.labels, split.texts, bags)


@dataclass(frozen=True)
class LocalTexts:
    """A client's splits before featurization."""

    fit: data_mod.Split
    calibration: data_mod.Split
    test: data_mod.Split
    num_classes: int


@lru_cache(maxsize=1024)  # a Ray actor serves many nodes: keep all of them (bench/rounds.py: 200)
def _local_texts(cfg_items: tuple, partition_id: int, num_partitions: int, data_path: str) -> LocalTexts:
    cfg = dict(cfg_items)
    if data_path:
        # Deployment: the node holds its own data (train/test CSVs) in data_path.
        ds = data_mod.load_local(Path(data_path), cfg["train-file"], cfg["test-file"])
        fit_rows, cal_rows = calibration_split(np.arange(len(ds.train)), cfg["calibration-fraction"], cfg["seed"], partition_id)
        test_rows = np.arange(len(ds.test))
    else:
        ds = load_server_dataset(cfg)
        part = _partitions(
            _data_args(cfg), cfg["max-train-items"], cfg["max-test-items"], cfg["seed"], num_partitions,
            cfg["dirichlet-alpha"], cfg["calibration-fraction"], cfg["min-partition-size"], cfg["test-label-mix"],
        )[partition_id]
        fit_rows, cal_rows, test_rows = part.fit, part.calibration, part.test
    return LocalTexts(ds.train.subset(fit_rows), ds.train.subset(cal_rows), ds.test.subset(test_rows), ds.num_classes)


@lru_cache(maxsize=1024)
def _local_data_cached(cfg_items: tuple, partition_id: int, num_partitions: int, data_path: str) -> LocalData:
    cfg = dict(cfg_items)
    texts = _local_texts(cfg_items, partition_id, num_partitions, data_path)
    tag = f"client {partition_id}"
    return LocalData(
        fit=_encode(texts.fit, cfg, f"{tag} fit"),
        calibration=_encode(texts.calibration, cfg, f"{tag} calibration"),
        test=_encode(texts.test, cfg, f"{tag} test"),
        num_classes=texts.num_classes,
    )


def _partition(context: Context, cfg: dict[str, Any]) -> tuple[int, int]:
    nc = context.node_config
    return int(nc.get("partition-id", 0)), int(nc.get("num-partitions", cfg["num-clients"]))


def local_texts(context: Context, cfg: dict[str, Any]) -> LocalTexts:
    """This node's splits, not featurized (all that encoder fine-tuning reads)."""
    pid, n = _partition(context, cfg)
    return _local_texts(tuple(sorted(cfg.items())), pid, n, str(context.node_config.get("data-path", "")))


def local_data(context: Context, cfg: dict[str, Any]) -> LocalData:
    """This node's data, featurized by its encoder (the fine-tuned one once installed); cached
    per process (Ray actors serve many nodes)."""
    pid, n = _partition(context, cfg)
    if "encoder" in context.state:
        cfg = {**cfg, "slm-model": str(context.state["encoder"]["path"])}
    return _local_data_cached(tuple(sorted(cfg.items())), pid, n, str(context.node_config.get("data-path", "")))


def cluster_id(context: Context, cfg: dict[str, Any]) -> int:
    """Deployment: ``cluster-id`` from the node config; simulation: a rule on partition-id."""
    if "cluster-id" in context.node_config:
        return int(context.node_config["cluster-id"])
    pid, n = _partition(context, cfg)
    return cluster_of_partition(pid, n, cfg["num-clusters"])


# ---- node-local state ---------------------------------------------------------------------------


def _tau(context: Context) -> float | None:
    return float(context.state["threshold"]["tau"]) if "threshold" in context.state else None


def _starting_tau(context: Context, reference: float, alpha: float) -> float:
    """tau_i moved towards the server's reference (the reference itself on first contact)."""
    current = _tau(context)
    return reference if current is None else personalize(current, reference, alpha)


def _set_tau(context: Context, tau: float) -> None:
    context.state["threshold"] = MetricRecord({"tau": float(tau)})


def _restore(context: Context, held: ArrayRecord) -> None:
    if "ids" in held:
        context.state["feedback"] = ArrayRecord({k: held[k] for k in ("ids", "beta", "final")})
    if "tau" in held:
        _set_tau(context, float(to_numpy(held["tau"])[0]))


def _known_feedback(context: Context) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibration items the LLM already judged: ids, rejection probability, final class."""
    if "feedback" not in context.state:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    rec = context.state["feedback"]
    return to_numpy(rec["ids"]), to_numpy(rec["beta"]).astype(np.float64), to_numpy(rec["final"])


def _prototypes(context: Context) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """The cluster's P2P prototypes (own, neighbours), or None before the first refresh."""
    return unpack_prototypes(context.state["prototypes"]) if "prototypes" in context.state else None


def _peer_tiers(context: Context, cfg: dict[str, Any], x: np.ndarray, drafts: np.ndarray) -> np.ndarray:
    """Tier (1 own cluster, 2 neighbour, 3 LLM) of each uncertain item under peer consensus."""
    protos = _prototypes(context)
    if protos is None:
        return np.full(len(drafts), 3)
    return resolve(x, drafts, protos[0], protos[1], cfg["p2p-delta"], cfg["p2p-margin"])


def routing_of(probs: np.ndarray, uncertainty: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return probs, get_measure(uncertainty)(probs), probs.argmax(axis=1)


SPLITS = ("fit", "calibration", "test")


def own_label_counts(texts: LocalTexts) -> np.ndarray:
    """The client's labelled rows (fit and calibration) per class: its label mix."""
    return label_counts(np.concatenate([texts.fit.labels, texts.calibration.labels]), texts.num_classes)


def head_outputs(head: SoftmaxHead, data: LocalData, own_counts: np.ndarray | None, pooled_counts: np.ndarray | None
                 ) -> tuple[dict[str, np.ndarray], bool]:
    """The head's class probabilities for every split (``SPLITS``), and whether the queries got
    the client's own label mix. With both label counts they are re-weighted from the pooled mix
    to the client's own (``label_prior``): always for its labelled rows (fit, calibration), which
    follow its mix by definition; for its queries (test) only if their unlabelled distribution
    is likelier under its own mix than under the pooled one."""
    probs = {s: head.predict_proba(getattr(data, s).inputs) for s in SPLITS}
    if own_counts is None or pooled_counts is None:
        return probs, False
    own, pooled = prior_of(own_counts), prior_of(pooled_counts)
    queries = likelier_prior(probs["test"], own, pooled)
    priors = {"fit": own, "calibration": own, "test": queries}
    return {s: shift_prior(p, priors[s], pooled) for s, p in probs.items()}, queries is own


def _keep_head_outputs(context: Context, cfg: dict[str, Any], data: LocalData, content: RecordDict) -> None:
    """The head is fixed once trained: keep its class probabilities for every local item rather
    than its weights. Routing needs only those, and a head with n-gram weights is megabytes that
    Flower's simulation would move with the node's state on every message."""
    head = head_from_config(cfg, data.fit.x.shape[1], data.num_classes).set_params(record_arrays(content["arrays"]))
    pooled = to_numpy(content["label-counts"]["pooled"]) if "label-counts" in content else None
    own = own_label_counts(local_texts(context, cfg)) if pooled is not None else None
    probs, own_prior_queries = head_outputs(head, data, own, pooled)
    context.state["head-outputs"] = ArrayRecord({s: to_array(p) for s, p in probs.items()})
    context.state["label-prior"] = ConfigRecord({"queries-own-prior": int(own_prior_queries)})


def _routing_inputs(context: Context, cfg: dict[str, Any], split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``routing_of`` the final head's probabilities for one split (``SPLITS``)."""
    return routing_of(to_numpy(context.state["head-outputs"][split]), cfg["uncertainty"])


def _threshold_config(cfg: dict[str, Any]) -> ThresholdConfig:
    return ThresholdConfig(
        kappa=cfg["kappa"], lam=cfg["lambda"], lr=cfg["threshold-lr"], local_steps=cfg["threshold-local-steps"]
    )


# ---- handlers -----------------------------------------------------------------------------------


def _info(context: Context, cfg: dict[str, Any], data: LocalTexts | LocalData) -> ConfigRecord:
    """What the server needs to know of a client: cluster, partition, sizes, classes, embedding width."""
    info = {
        "cluster-id": cluster_id(context, cfg),
        "partition-id": _partition(context, cfg)[0],
        "n-fit": len(data.fit),
        "n-calibration": len(data.calibration),
        "n-test": len(data.test),
        "num-classes": data.num_classes,
    }
    if isinstance(data, LocalData):
        info["dim"] = int(data.fit.x.shape[1])
    if cfg["local-label-prior"]:  # the server adds them up to the pooled label mix
        info["label-counts"] = [int(c) for c in own_label_counts(local_texts(context, cfg))]
    return ConfigRecord(info)


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    """Load and featurize the local data (only load it when the encoder will be fine-tuned
    first); report cluster and sizes."""
    cfg = run_config(context)
    data = local_texts(context, cfg) if cfg["encoder-rounds"] else local_data(context, cfg)
    return Message(RecordDict({"info": _info(context, cfg, data)}), reply_to=msg)


@app.train("encoder")
def train_encoder(msg: Message, context: Context) -> Message:
    """Fine-tune the encoder's top layers on the local fit split, from the global weights."""
    cfg = run_config(context)
    texts = local_texts(context, cfg)
    tuner = get_tuner(cfg["slm-model"], cfg["encoder-layers"], texts.num_classes).set_arrays(record_arrays(msg.content["arrays"]))
    server_round = int(msg.content["config"]["server-round"])
    rng = np.random.default_rng([cfg["seed"], _partition(context, cfg)[0], server_round])
    tuning = TuningConfig(cfg["encoder-steps"], cfg["encoder-batch-size"], cfg["encoder-lr"], cfg["max-length"])
    loss = tuner.train(texts.fit.texts, texts.fit.labels, tuning, rng)
    metrics = MetricRecord({"num-examples": len(texts.fit), "train-loss": loss})
    return Message(RecordDict({"arrays": arrays_record(tuner.get_arrays()), "metrics": metrics}), reply_to=msg)


@app.query("encoder")
def install_encoder(msg: Message, context: Context) -> Message:
    """Install the fine-tuned encoder and featurize the local data with it."""
    cfg = run_config(context)
    arrays = record_arrays(msg.content["arrays"])
    tuner = get_tuner(cfg["slm-model"], cfg["encoder-layers"], local_texts(context, cfg).num_classes).set_arrays(arrays)
    folder = tuner.install(resolve_cache_dir(cfg["cache-dir"]))
    context.state["encoder"] = ConfigRecord({"path": str(folder)})
    return Message(RecordDict({"info": _info(context, cfg, local_data(context, cfg))}), reply_to=msg)


@app.train("head")
def train_head(msg: Message, context: Context) -> Message:
    """Fit the head on the local fit split, starting from the global weights."""
    cfg = run_config(context)
    data = local_data(context, cfg)
    head = head_from_config(cfg, data.fit.x.shape[1], data.num_classes).set_params(record_arrays(msg.content["arrays"]))
    server_round = int(msg.content["config"]["server-round"])
    rng = np.random.default_rng([cfg["seed"], _partition(context, cfg)[0], server_round])
    head.fit(data.fit.inputs, data.fit.y, HeadConfig(epochs=cfg["head-epochs"], lr=cfg["head-lr"], l2=cfg["head-l2"]), rng)
    accuracy = float(np.mean(head.predict_proba(data.fit.inputs).argmax(1) == data.fit.y)) if len(data.fit) else 0.0
    metrics = MetricRecord(
        {"num-examples": len(data.fit), "train-loss": head.log_loss(data.fit.inputs, data.fit.y), "train-accuracy": accuracy}
    )
    return Message(RecordDict({"arrays": arrays_record(head.get_params()), "metrics": metrics}), reply_to=msg)


@app.query("escalate")
def escalate(msg: Message, context: Context) -> Message:
    """Route one split with the current threshold and return the items for the LLM.

    Calibration (training): the client first moves tau_i towards the server's
    reference, then sends its escalated items plus an exploration band below
    tau, skipping items whose feedback it already has (the head is fixed, so
    the LLM's verdict on an item does not change). Test (inference): it sends
    exactly the items the policy's threshold escalates.
    """
    cfg = run_config(context)
    data = local_data(context, cfg)
    if "arrays" in msg.content:  # the final head, sent once before threshold learning
        _keep_head_outputs(context, cfg, data, msg.content)
    if "restore" in msg.content:  # a resumed run: the LLM feedback and the threshold this client held
        _restore(context, msg.content["restore"])
    if "prototypes" in msg.content:  # the cluster's refreshed P2P prototypes (the token cache)
        context.state["prototypes"] = msg.content["prototypes"]
    conf = msg.content["config"]
    split_name = str(conf["split"])
    split = data.calibration if split_name == "calibration" else data.test
    probs, h, drafts = _routing_inputs(context, cfg, split_name)
    if split_name == "calibration":
        tau = _starting_tau(context, float(conf["tau-reference"]), cfg["personalization-alpha"])
        _set_tau(context, tau)
        known = _known_feedback(context)[0]
        mask = exploration_mask(h, tau, cfg["exploration-band"])
        mask[known] = False
    else:
        own = bool(conf["own-threshold"])
        tau = _starting_tau(context, float(conf["tau-reference"]), cfg["personalization-alpha"]) if own else float(conf["tau"])
        tiers = np.where(h > tau, 3, 0)
        if bool(conf["try-p2p"]):
            uncertain = np.flatnonzero(tiers == 3)
            tiers[uncertain] = _peer_tiers(context, cfg, split.x[uncertain], drafts[uncertain])
        context.state["routing"] = ArrayRecord({"tiers": to_array(tiers.astype(np.int8))})
        mask = tiers == 3
    ids = np.flatnonzero(mask)
    batch = EscalationBatch(ids=ids, texts=[split.texts[i] for i in ids], probs=probs[ids], drafts=drafts[ids])
    content = pack_escalation(batch)
    content["metrics"] = MetricRecord({"num-items": len(split), "num-escalated": len(ids), "tau": float(tau)})
    return Message(content, reply_to=msg)


@app.train("threshold")
def train_threshold(msg: Message, context: Context) -> Message:
    """Merge the LLM feedback, measure P2P on it, step tau_i, share prototype sums."""
    cfg = run_config(context)
    data = local_data(context, cfg)
    ids, verdict = unpack_feedback(msg.content["feedback"])
    _, h, drafts = _routing_inputs(context, cfg, "calibration")
    tau = _tau(context)
    metrics: dict[str, float] = {"num-examples": len(data.calibration), "p2p-attempts": 0, "p2p-hits": 0, "p2p-false-hits": 0}
    known_ids, known_beta, known_final = _known_feedback(context)
    all_ids = np.concatenate([known_ids, ids]).astype(np.int64)
    all_beta = np.concatenate([known_beta, verdict.beta])
    all_final = np.concatenate([known_final, verdict.final]).astype(np.int64)
    context.state["feedback"] = ArrayRecord(
        {"ids": to_array(all_ids), "beta": to_array(all_beta.astype(np.float32)), "final": to_array(all_final)}
    )
    if cfg["p2p"] and _prototypes(context) is not None:
        # Would peers have answered the items this client escalates, and how often wrongly?
        # Measured on every escalated item with a known LLM verdict; training itself still asks
        # the LLM about every item, since its verdict is the learning signal.
        sel = h[all_ids] > tau
        items, finals = all_ids[sel], all_final[sel]
        hits = _peer_tiers(context, cfg, data.calibration.x[items], drafts[items]) < 3
        metrics.update(
            {"p2p-attempts": len(items), "p2p-hits": int(hits.sum()), "p2p-false-hits": int(np.sum(hits & (finals != drafts[items])))}
        )
    tcfg = _threshold_config(cfg)
    n = max(len(data.calibration), 1)
    h_known = h[all_ids]
    metrics["loss-before"] = loss(tau, h_known, all_beta, tcfg.lam, tcfg.kappa, n)
    tau = local_update(tau, h_known, all_beta, tcfg, n)
    _set_tau(context, tau)
    metrics.update(
        {
            "loss": loss(tau, h_known, all_beta, tcfg.lam, tcfg.kappa, n),
            "escalation-rate": float(np.mean(h > tau)) if len(h) else 0.0,
            "feedback-items": len(all_ids),
        }
    )
    content = RecordDict({"arrays": arrays_record([np.array([tau], dtype=np.float64)]), "metrics": MetricRecord(metrics)})
    if cfg["p2p"]:
        sums = pack_class_sums(_resolved_class_sums(context, cfg, data, tau, h, drafts, all_ids, all_final))
        previous = unpack_class_sums(context.state["p2p-sent"]).prototypes() if "p2p-sent" in context.state else None
        if prototypes_changed(previous, unpack_class_sums(sums).prototypes()):
            content["p2p"] = sums  # only sums that move the prototypes travel; the edge keeps the latest
            context.state["p2p-sent"] = sums
    return Message(content, reply_to=msg)


def _resolved_class_sums(
    context: Context, cfg: dict[str, Any], data: LocalData, tau: float,
    h_cal: np.ndarray, drafts_cal: np.ndarray, verified_ids: np.ndarray, verified_final: np.ndarray,
) -> ClassSums:
    """Per-class sums of the embeddings this client resolved: confident answers and LLM-verified ones.

    Sums and counts leave the node, never the embeddings themselves.
    """
    _, h_fit, drafts_fit = _routing_inputs(context, cfg, "fit")
    labels = drafts_cal.copy()
    labels[verified_ids] = verified_final
    resolved = h_cal <= tau
    resolved[verified_ids] = True
    confident_fit = h_fit <= tau
    return ClassSums.of(data.fit.x[confident_fit], drafts_fit[confident_fit], data.num_classes) + ClassSums.of(
        data.calibration.x[resolved], labels[resolved], data.num_classes
    )


@app.evaluate("hlm")
def evaluate_hlm(msg: Message, context: Context) -> Message:
    """Score the HLM answers: the SLM draft where local, the LLM's answer where escalated."""
    cfg = run_config(context)
    data = local_data(context, cfg)
    _, _, drafts = _routing_inputs(context, cfg, "test")
    ids, verdict = unpack_feedback(msg.content["feedback"])
    tiers = to_numpy(context.state["routing"]["tiers"])
    final = drafts.copy()  # local and peer answers keep the draft (peers confirm it)
    final[ids] = verdict.final
    local = tiers == 0
    peer = (tiers == 1) | (tiers == 2)
    y = data.test.y
    metrics = MetricRecord(
        {
            "num-examples": len(y),
            "correct": int(np.sum(final == y)),
            "escalated": int(np.sum(tiers == 3)),
            "oracle-failed": int(np.sum(tiers == 3) - len(ids)),  # unanswered: they kept the draft
            "accepted": int(np.sum(verdict.accepted)),
            "local-correct": int(np.sum((final == y) & local)),
            "slm-correct": int(np.sum(drafts == y)),
            "p2p-own": int(np.sum(tiers == 1)),
            "p2p-neighbour": int(np.sum(tiers == 2)),
            "p2p-wrong": int(np.sum(peer & (final != y))),
            "queries-own-prior": int(context.state["label-prior"]["queries-own-prior"]),
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)

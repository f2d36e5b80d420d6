"""Results: ``results.json``, a threshold plot, a Markdown summary, a stdout table.

Everything a run measured is reduced here from the per-client evaluation
replies, so the numbers in the JSON, the summary and the table agree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhlm_app.app.checkpoint import Progress
from fedhlm_app.config import RunConfig
from fedhlm_app.paths import results_dir
from fedhlm_app.reporting.communication import communication
from fedhlm_app.reporting.ledger import Ledger
from fedhlm_app.routing.p2p import TIERS, PeerCoordinator
from fedhlm_app.routing.peer_bound import NEVER, wilson_interval

if TYPE_CHECKING:
    from fedhlm_app.app.protocol import NodeInfo

POLICY_TITLES = {
    "fedhlm": "FedHLM (learned thresholds)",
    "fedhlm_no_p2p": "FedHLM without P2P",
    "slm_only": "SLM only",
    "static_threshold": "static threshold",
    "cloud_only": "cloud only (every item to the LLM)",
}


def _config_value(key: str, value: Any) -> Any:
    """A config value as results.json shows it: secrets redacted, infinity as a string."""
    if key == "oracle-api-key" and value:
        return "(redacted)"
    return str(value) if isinstance(value, float) and value == float("inf") else value


def _oracle_block(outcome: RunOutcome) -> dict[str, Any]:
    """Which oracle answered, and every batch it did not (fully) answer."""
    asked, failed = outcome.oracle_items()
    return {
        "backend": outcome.cfg.oracle,
        "oracle_failures": failed,  # items that kept the SLM draft because the oracle did not answer
        "items_asked": asked,
        "failure_rate": failed / asked if asked else 0.0,
        "failed_batches": outcome.oracle_failures,
    }


def _oracle_warning(oracle: dict[str, Any]) -> list[str]:
    """Summary lines that make an oracle outage impossible to miss."""
    if not oracle["oracle_failures"]:
        return []
    causes = sorted({f["cause"] for f in oracle["failed_batches"]})
    head = (
        "**WARNING: the oracle never answered.** Every escalated item kept its SLM draft: the accuracies "
        "below are the SLM's, and the thresholds learned nothing from LLM feedback."
        if oracle["oracle_failures"] >= oracle["items_asked"]
        else f"**WARNING: the oracle did not answer {oracle['oracle_failures']} of {oracle['items_asked']} items** "
        "(they kept their SLM draft)."
    )
    return [head, "", *[f"- cause: {c}" for c in causes[:5]], ""]


def _log(msg: str, *args: Any) -> None:
    from flwr.common import log  # the Flower logger, so lines interleave with Flower's

    log(INFO, msg, *args)


def policy_summary(per_client: dict[int, dict[str, float]]) -> dict[str, float]:
    """Totals over clients: accuracy, LLM rate, local rate, SLM accuracy."""
    n = sum(c["num-examples"] for c in per_client.values())
    total = lambda key: sum(c[key] for c in per_client.values())  # noqa: E731
    p2p = total("p2p-own") + total("p2p-neighbour")
    share = lambda count: count / n if n else 0.0  # noqa: E731 - no test items at all: every share is 0
    return {
        "accuracy": share(total("correct")),
        "llm_rate": share(total("escalated")),
        "local_rate": share(n - total("escalated") - p2p),
        "p2p_rate": share(p2p),
        "slm_accuracy": share(total("slm-correct")),
        "llm_items": int(total("escalated")),
        "oracle_failed_items": int(total("oracle-failed")),
        "num_items": int(n),
    }


def p2p_summary(per_client: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Peer answers: share by tier, hit rate among attempts, false reuse with a Wilson 95% CI."""
    rows = list(per_client.values())
    total = lambda key: sum(c[key] for c in rows)  # noqa: E731
    n = total("num-examples")
    peer = int(total("p2p-own") + total("p2p-neighbour"))
    wrong = int(total("p2p-wrong"))
    # Attempts: uncertain items of clients whose cluster tried peers first.
    attempts = int(sum(c["escalated"] + c["p2p-own"] + c["p2p-neighbour"] for c in per_client.values() if c["try-p2p"]))
    skipped = int(sum(c["escalated"] for c in per_client.values() if not c["try-p2p"]))
    lo, hi = wilson_interval(wrong, peer)
    counts = {
        "local": n - total("escalated") - peer, "p2p-own-cluster": total("p2p-own"),
        "p2p-neighbour": total("p2p-neighbour"), "llm": total("escalated"),
    }
    return {
        "tiers": {t: counts[t] / n if n else 0.0 for t in TIERS},
        "attempts": attempts,
        "hits": peer,
        "hit_rate": peer / attempts if attempts else 0.0,
        "false_reuse": wrong,
        "false_reuse_rate": wrong / peer if peer else 0.0,
        "false_reuse_ci95": [lo, hi],
        "skipped_items": skipped,
    }


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write`` to a temporary name, then rename: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # same suffix: np.savez and savefig keep the name
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n"))


def plot_thresholds(rounds: list[dict[str, Any]], uncertainty: str, path: Path) -> None:
    """Global and per-cluster threshold per round (on the ``uncertainty`` measure), with the local loss and escalation rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["round"] for r in rounds]
    for cluster in sorted({c for r in rounds for c in r["tau_clusters"]}, key=int):
        ax.plot(xs, [r["tau_clusters"].get(cluster) for r in rounds], lw=1, alpha=0.7, label=f"cluster {cluster}")
    ax.plot(xs, [r["tau_global"] for r in rounds], "k-", lw=2.5, label="global")
    ax.set_xlabel("threshold round")
    ax.set_ylabel(f"threshold tau ({uncertainty} uncertainty)")
    loss_ax = ax.twinx()
    # The loss is taken over the items with LLM feedback so far, a set that grows as tau falls.
    loss_ax.plot(xs, [r["loss"] for r in rounds], "r--", lw=1, label="mean local loss (items with feedback)")
    loss_ax.plot(xs, [r["escalation_rate"] for r in rounds], "b:", lw=1, label="calibration escalation rate")
    loss_ax.set_ylabel("local loss / escalation rate")
    lines = ax.get_legend_handles_labels()[0] + loss_ax.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + loss_ax.get_legend_handles_labels()[1]
    ax.legend(lines, labels, fontsize=8, loc="best")
    ax.set_title("FedHLM threshold learning")
    fig.tight_layout()
    _write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def _p2p_block(
    cfg: RunConfig,
    evaluation: dict[str, dict[int, dict[str, float]]],
    info: dict[int, NodeInfo],
    policies: dict[str, dict[str, float]],
    llm_bytes: dict[str, int],
    peers: PeerCoordinator | None,
    overall: dict[str, Any],
) -> dict[str, Any]:
    """P2P outcomes overall and per cluster, and FedHLM with vs without P2P on the same items."""
    if peers is None:
        return {"enabled": False}
    ours = evaluation["fedhlm"]
    per_cluster = {}
    for cluster in sorted({i.cluster_id for i in info.values()}):
        members = {n: row for n, row in ours.items() if info[n].cluster_id == cluster}
        thresholds = peers.thresholds.get(cluster)
        held_out = peers.evidence[cluster].accepted(thresholds) if thresholds is not None else (0, 0, 0)
        per_cluster[str(cluster)] = {
            **p2p_summary(members),
            "tried": peers.enabled(cluster),
            "certified_thresholds": [None if t == NEVER else float(t) for t in thresholds] if thresholds is not None else [],
            "held_out_items": held_out[0],
            "held_out_accepted": held_out[1],
            "held_out_wrong": held_out[2],
            "held_out_wrong_if_threshold_raised": peers.evidence[cluster].wrong_if_threshold_raised(held_out[1]) if thresholds is not None else 0.0,
        }
    with_p2p, without = policies["fedhlm"], policies["fedhlm_no_p2p"]
    return {
        "enabled": True,
        **overall,
        "per_cluster": per_cluster,
        "max_error": cfg.p2p_max_error,
        "costs": {"p2p": cfg.p2p_cost, "llm": cfg.llm_cost, "error": cfg.p2p_error_cost},
        "beat_threshold": cfg.p2p_beat_threshold,
        "with_vs_without": {
            "with_p2p": {"accuracy": with_p2p["accuracy"], "llm_rate": with_p2p["llm_rate"], "llm_bytes": llm_bytes["fedhlm"]},
            "without_p2p": {"accuracy": without["accuracy"], "llm_rate": without["llm_rate"], "llm_bytes": llm_bytes["fedhlm_no_p2p"]},
            "llm_rate_saved": without["llm_rate"] - with_p2p["llm_rate"],
            "accuracy_cost": without["accuracy"] - with_p2p["accuracy"],
        },
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def summary_table(policies: dict[str, dict[str, float]], costs: dict[str, dict[str, Any]]) -> list[str]:
    """One row per policy: quality, where queries went, and its bytes (``communication``'s ``policies``)."""
    rows = ["| policy | accuracy | LLM rate | local rate | P2P rate | LLM bytes (inference) | training bytes | break-even queries |",
            "|---|---|---|---|---|---|---|---|"]
    for name, s in policies.items():
        cost = costs[name]
        even = cost["break_even_queries"]
        rows.append(
            f"| {POLICY_TITLES.get(name, name)} | {s['accuracy']:.4f} | {s['llm_rate']:.4f} | {s['local_rate']:.4f} | "
            f"{s['p2p_rate']:.4f} | {_fmt_bytes(cost['inference_bytes'])} | {_fmt_bytes(cost['training_bytes'])} | "
            f"{'-' if name == 'cloud_only' else 'never' if even is None else f'{even:,}'} |"
        )
    return rows


def _dropouts(info: dict[int, NodeInfo], dropped: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Nodes that left the run: who (cluster, partition), in which phase, why."""
    return [
        {
            "node_id": node,
            "cluster": info[node].cluster_id if node in info else None,  # None: left during setup
            "partition_id": info[node].partition_id if node in info else None,
            "phase": where["phase"],
            "round": where["round"],
            "reason": where["reason"],
        }
        for node, where in sorted(dropped.items())
    ]


def _dropout_lines(dropouts: list[dict[str, Any]], started: int) -> list[str]:
    if not dropouts:
        return []
    who = ", ".join(f"node {d['node_id']} (cluster {d['cluster']}) in {d['phase']}" for d in dropouts)
    return [f"- **{len(dropouts)} of {started} clients dropped out**: {who}; the results cover the remaining clients."]


@dataclass(frozen=True)
class SavedModel:
    """What ``model.npz`` holds: the global head, the fine-tuned encoder layers (empty when the encoder
    stayed frozen) and the pooled label counts the clients re-weighted the head with (None without
    the local label prior)."""

    head: list[np.ndarray]
    encoder: list[np.ndarray]
    label_counts: np.ndarray | None

    @staticmethod
    def load(path: Path) -> SavedModel:
        with np.load(path) as saved:
            layers = lambda prefix: [saved[f"{prefix}_{i}"] for i in range(sum(k.startswith(prefix + "_") for k in saved.files))]  # noqa: E731
            return SavedModel(layers("head"), layers("encoder"), saved["label_counts"] if "label_counts" in saved.files else None)


@dataclass
class RunOutcome:
    """Everything a finished run measured, as the report reads it."""

    cfg: RunConfig
    dataset_source: str
    class_names: list[str]
    info: dict[int, NodeInfo]  # node -> what it reported at setup (the nodes that passed it)
    evaluation: dict[str, dict[int, dict[str, float]]]  # policy -> node -> its scores
    progress: Progress  # rounds, histories, the trained models
    ledger: Ledger
    failures: list[dict[str, Any]]
    dropped: dict[int, dict[str, Any]]
    rejected: list[dict[str, Any]]
    oracle_failures: list[dict[str, Any]]
    peers: PeerCoordinator | None
    pooled_label_counts: np.ndarray | None
    timings: dict[str, float]
    started_epoch: float

    def oracle_items(self) -> tuple[int, int]:
        """Items sent to the oracle (training and every policy) and items it did not answer."""
        asked = self.progress.training_escalations + sum(row["escalated"] for rows in self.evaluation.values() for row in rows.values())
        return int(asked), sum(f["items"] for f in self.oracle_failures)

    @property
    def oracle_never_answered(self) -> bool:
        asked, failed = self.oracle_items()
        return asked > 0 and failed >= asked


def _client_rows(o: RunOutcome) -> list[dict[str, Any]]:
    """Each client's FedHLM outcome, in partition order."""
    rows = []
    for node, row in sorted(o.evaluation["fedhlm"].items(), key=lambda kv: o.info[kv[0]].partition_id):
        n, info = row["num-examples"] or 1, o.info[node]
        rows.append({
            "node_id": node,
            "partition_id": info.partition_id,
            "cluster": info.cluster_id,
            "tau": row["tau"],
            "num_test": int(row["num-examples"]),
            "num_calibration": info.n_calibration,
            "num_fit": info.n_fit,
            "accuracy": row["correct"] / n,
            "slm_accuracy": row["slm-correct"] / n,
            "llm_rate": row["escalated"] / n,
            "local_rate": 1 - row["escalated"] / n,
            "adapted_queries": float(row["adapted-queries"]),  # share answered under its estimated label mix
        })
    return rows


def results_of(o: RunOutcome, policies: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Everything ``results.json`` holds, from the outcome and its ``policy_summary`` per policy."""
    cfg, info, evaluation, ledger, rounds = o.cfg, o.info, o.evaluation, o.ledger, o.progress.rounds
    ours = policies["fedhlm"]
    ours_p2p = p2p_summary(evaluation["fedhlm"])
    traffic = communication(ledger, ours["num_items"], list(policies))
    llm_bytes = traffic["inference_llm_bytes"]
    llm_use = _llm_use(o, policies, llm_bytes)
    clients = _client_rows(o)
    clusters = {}
    for cluster in sorted({c["cluster"] for c in clients}):
        members = {node: row for node, row in evaluation["fedhlm"].items() if info[node].cluster_id == cluster}
        clusters[str(cluster)] = {**policy_summary(members), "clients": len(members)}
    cluster_names = sorted({c for r in rounds for c in r["tau_clusters"]}, key=int)
    return {
        "run_name": cfg.run_name,
        "accuracy": ours["accuracy"],
        "llm_rate": ours["llm_rate"],
        "llm_reduction": 1.0 - ours["llm_rate"] / (policies["cloud_only"]["llm_rate"] or 1.0),  # inference only
        "llm_reduction_total": llm_use["reduction_total"],  # training and inference, against cloud-only
        "llm_use": llm_use,
        "local_rate": ours["local_rate"],
        "p2p_rate": ours["p2p_rate"],
        "tiers": ours_p2p["tiers"],
        "num_test_items": ours["num_items"],
        "final_threshold": rounds[-1]["tau_global"] if rounds else cfg.tau_init,
        "baselines": {
            "slm_only": policies["slm_only"],
            "cloud_only": policies["cloud_only"],
            "static_threshold": {**policies["static_threshold"], "tau": cfg.static_threshold},
        },
        "thresholds": {
            "global": [r["tau_global"] for r in rounds],
            "clusters": {c: [r["tau_clusters"].get(c) for r in rounds] for c in cluster_names},
            "rounds": rounds,
        },
        "p2p": _p2p_block(cfg, evaluation, info, policies, llm_bytes, o.peers, ours_p2p),
        "head_rounds": o.progress.head.history,
        "encoder_rounds": o.progress.encoder.history,
        "training": {"llm_items": o.progress.training_escalations, "calibration_items": sum(i.n_calibration for i in info.values())},
        "clients": clients,
        "adapted_queries": float(np.mean([c["adapted_queries"] for c in clients])) if clients else 0.0,
        "clusters": clusters,
        "communication": traffic,
        "failures": o.failures,
        "dropouts": _dropouts(info, o.dropped),
        "rejected_updates": o.rejected,  # invalid updates dropped before aggregation
        "oracle": _oracle_block(o),
        "dataset": {"source": o.dataset_source, "classes": o.class_names},
        "wall_time_s": o.timings["total"],
        "timings_s": o.timings,
        "started_epoch": o.started_epoch,  # when the ServerApp started (Unix time), for bench/main_job.py
        "config": {k: _config_value(k, v) for k, v in cfg.as_dict().items()},
    }


def _llm_use(o: RunOutcome, policies: dict[str, dict[str, float]], llm_bytes: dict[str, int]) -> dict[str, Any]:
    """Every item and byte sent to the LLM, training (threshold learning) included, against cloud-only,
    which needs no training: the reduction users pay for, beside the inference-only one."""
    train_items, train_bytes = o.progress.training_escalations, o.ledger.total("threshold", "client->llm")
    items, nbytes = policies["fedhlm"]["llm_items"], llm_bytes["fedhlm"]
    cloud_items, cloud_bytes = policies["cloud_only"]["llm_items"], llm_bytes["cloud_only"]
    return {
        "training_items": train_items, "inference_items": items, "total_items": train_items + items,
        "training_bytes": train_bytes, "inference_bytes": nbytes, "total_bytes": train_bytes + nbytes,
        "cloud_only_items": cloud_items, "cloud_only_bytes": cloud_bytes,
        "reduction_total": 1.0 - (train_items + items) / (cloud_items or 1),
        "reduction_total_bytes": 1.0 - (train_bytes + nbytes) / (cloud_bytes or 1),
        "reduction_inference_only": 1.0 - items / (cloud_items or 1),
    }


def _save_model(path: Path, o: RunOutcome, clients: list[dict[str, Any]]) -> None:
    """The learned model: the global head, the fine-tuned encoder layers (if any), the pooled label
    counts the clients re-weighted it with, and each client's threshold."""
    pooled = {"label_counts": o.pooled_label_counts} if o.pooled_label_counts is not None else {}
    _write_atomically(path, lambda tmp: np.savez(
        tmp, **{f"head_{i}": p for i, p in enumerate(o.progress.head.params)},
        **{f"encoder_{i}": p for i, p in enumerate(o.progress.encoder.params or [])}, **pooled,
        partition_ids=np.array([c["partition_id"] for c in clients]), taus=np.array([c["tau"] for c in clients]),
        clusters=np.array([c["cluster"] for c in clients]),
    ))


def summary_lines(o: RunOutcome, results: dict[str, Any], table: list[str]) -> list[str]:
    """``summary.md``: the table and the headline numbers, warnings first."""
    cfg, rounds, communication = o.cfg, o.progress.rounds, results["communication"]
    p2p, rejected = results["p2p"], results["rejected_updates"]
    return [
        f"# FedHLM run `{cfg.run_name}`",
        "",
        *_oracle_warning(results["oracle"]),
        f"{len(results['clients'])} clients in {len(results['clusters'])} clusters, Dirichlet alpha {cfg.dirichlet_alpha}, "
        f"{len(rounds)} threshold rounds, strategies `{cfg.edge_strategy}` (edge) and `{cfg.cloud_strategy}` (cloud), oracle `{cfg.oracle}`, "
        f"SLM `{cfg.slm_model}`, data `{o.dataset_source}`.",
        "",
        *table,
        "",
        f"- LLM transmissions cut by {results['llm_reduction_total']:.1%} against cloud-only, counting the "
        f"{results['llm_use']['training_items']} items asked while learning thresholds "
        f"({results['llm_reduction']:.1%} at inference alone); final global threshold {results['final_threshold']:.4f}.",
        *([f"- P2P (p2p-max-error {p2p['max_error']}): {p2p['hits']} of {p2p['attempts']} uncertain items answered by peers "
           f"(false reuse {p2p['false_reuse_rate']:.1%}, 95% CI {p2p['false_reuse_ci95'][0]:.1%}-{p2p['false_reuse_ci95'][1]:.1%}); "
           f"{sum(c['tried'] for c in p2p['per_cluster'].values())} of {len(p2p['per_cluster'])} clusters tried peers; "
           f"P2P traffic {_fmt_bytes(communication['p2p_bytes'])}."] if p2p["enabled"] else []),
        *_dropout_lines(results["dropouts"], len(set(o.info) | set(o.dropped))),  # setup skips are not in info
        *([f"- **{len(rejected)} invalid client updates rejected before aggregation** "
           "(`rejected_updates` in results.json names node, round and reason)."] if rejected else []),
        f"- Training-time LLM items: {o.progress.training_escalations} "
        f"({_fmt_bytes(communication['training_llm_bytes'])} to and from the LLM).",
        "- Training traffic " + _fmt_bytes(communication["training_bytes"]) + " (" + ", ".join(
            f"{phase} {_fmt_bytes(n)}" for phase, n in communication["training_bytes_by_phase"].items() if n) + f"; updates as "
        f"`{cfg.compression}`). Break-even: FedHLM's total bytes, training included, fall below cloud-only's after "
        + ("no number of queries" if communication["break_even_queries"] is None else f"{communication['break_even_queries']:,} queries")
        + " (at the LLM bytes per query measured here).",
        f"- Wall time {o.timings['total']:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in o.timings.items() if k != "total") + ").",
        "",
        "![thresholds](thresholds.png)" if rounds else "",
    ]


def _point_latest(root: Path, run_name: str) -> None:
    """``root/latest`` -> the run's folder, replaced atomically."""
    tmp_link = root / f".latest-{os.getpid()}"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    tmp_link.symlink_to(run_name, target_is_directory=True)
    os.replace(tmp_link, root / "latest")


def write_report(outcome: RunOutcome) -> Path:
    """Write results.json, model.npz, thresholds.png and summary.md; point ``latest`` at them."""
    o = outcome
    root = results_dir(o.cfg.results_dir)
    out = root / o.cfg.run_name
    out.mkdir(parents=True, exist_ok=True)
    policies = {name: policy_summary(per_client) for name, per_client in o.evaluation.items()}
    results = results_of(o, policies)
    _write_json(out / "results.json", results)
    if o.progress.head.params is not None:
        _save_model(out / "model.npz", o, results["clients"])
    if o.progress.rounds:
        plot_thresholds(o.progress.rounds, o.cfg.uncertainty, out / "thresholds.png")
    table = summary_table(policies, results["communication"]["policies"])
    _write_atomically(out / "summary.md", lambda tmp: tmp.write_text("\n".join(summary_lines(o, results, table)) + "\n"))
    _point_latest(root, o.cfg.run_name)
    _log("FedHLM results (%d test items, written to %s):", results["num_test_items"], out)
    for row in table:
        _log("%s", row)
    _log("LLM reduction %.2f%% counting training (%.2f%% at inference alone), wall time %.1f s", 100 * results["llm_reduction_total"],
         100 * results["llm_reduction"], o.timings["total"])
    return out

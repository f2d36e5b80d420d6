"""The P2P study of the evaluation harness (``--only p2p``): does peer reuse under an error bound
ever make the accuracy / LLM-rate trade-off worse, and does the bound hold on the test items?

Each seed runs the lambda sweep with P2P on under the loosest bound studied, so that peers answer
in some runs; each run reports FedHLM with and without peers on the same items. Every bound is
then replayed from each run's saved model and checkpoint with the clients' own functions
(``local_data``, ``head_outputs``, ``router.peer_evidence``, ``p2p.resolve``) on exactly the
verdicts each client held. The replay at the run's own bound must reproduce the run's numbers,
and the study reports the largest difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedhlm_app.reporting import evaluation as ev
from fedhlm_app.routing.peer_bound import NEVER, wilson_interval

BOUNDS = (0.02, 0.05, 0.1, 0.2, 0.3)


def variants(lambdas: list[float], default_lambda: float) -> dict[str, dict[str, Any]]:
    """The lambda sweep (with the default lambda) with P2P on, under the loosest bound."""
    return {f"lambda={lam}": {"lambda": lam, "p2p": True, "p2p-max-error": max(BOUNDS)} for lam in sorted({*lambdas, default_lambda})}


def replay(cfg, run_dir: Path, tau: float, bounds: tuple[float, ...]) -> dict[float, dict[str, float]]:
    """FedHLM with peers under each bound in ``bounds``, on the run's test items: accuracy, LLM
    rate, peer answers and wrong ones, and the clusters that tried peers."""
    from fedhlm_app.app import checkpoint
    from fedhlm_app.app.protocol import pack_class_sums, pack_prototypes, unpack_class_sums, unpack_prototypes
    from fedhlm_app.oracle.base import EscalationBatch, make_oracle, verify_safely
    from fedhlm_app.reporting.results import SavedModel
    from fedhlm_app.routing.p2p import ClassSums, PeerCoordinator
    from fedhlm_app.routing.router import LLM, Routing, peer_evidence, query_tiers, score
    from fedhlm_app.slm.head import head_from_config
    from fedhlm_app.slm.local_data import Placement, dataset, local_data, local_texts
    from fedhlm_app.slm.predict import CALIBRATION_AS_QUERIES, head_outputs

    model = SavedModel.load(run_dir / "model.npz")
    held = checkpoint.load(run_dir / "checkpoint.pkl", cfg).clients  # the LLM verdicts each client held
    oracle = make_oracle(cfg, dataset(cfg))
    clients = []
    for pid in range(cfg.num_clients):
        placement = Placement.of({"partition-id": pid, "num-partitions": cfg.num_clients}, cfg)
        data = local_data(cfg, placement, "")
        own = local_texts(cfg, placement).own_label_counts() if model.label_counts is not None else None
        probs = head_outputs(head_from_config(cfg, data.dim, data.num_classes).set_params(model.head), data, own, model.label_counts,
                             calibration_as_queries=True).probs
        test = Routing.of(probs["test"], cfg.uncertainty)
        escalated = np.flatnonzero(test.uncertainty > tau)
        batch = EscalationBatch(escalated, [data.test.texts[i] for i in escalated], test.probs[escalated], test.drafts[escalated])
        clients.append({"cluster": placement.cluster_id, "data": data, "calibration": Routing.of(probs[CALIBRATION_AS_QUERIES], cfg.uncertainty),
                        "test": test, "escalated": escalated, "llm_final": verify_safely(oracle, batch).final_classes(batch.drafts),
                        "sums": unpack_class_sums(pack_class_sums(ClassSums.of(data.fit.x, data.fit.y, data.num_classes))),
                        "held": held.get(pid, {})})
    oracle.close()
    sums = {pid: (c["cluster"], c["sums"]) for pid, c in enumerate(clients)}
    first = PeerCoordinator(cfg.p2p_neighbours, cfg.p2p_neighbour_k, bounds[0], cfg.peer_costs, cfg.p2p_beat_threshold)
    first.refresh(sums)
    # what the clients hold: the prototypes as they travel (float16)
    received = {k: unpack_prototypes(pack_prototypes(first.view(k))) for k in {c["cluster"] for c in clients}}
    evidence = {}
    for pid, c in enumerate(clients):
        ids, final = c["held"].get("ids", np.zeros(0, np.int64)), c["held"].get("final", np.zeros(0, np.int64))
        evidence[pid] = (c["cluster"], peer_evidence(c["calibration"], c["data"].calibration.x, tau, received[c["cluster"]], ids, final))
    out = {}
    for bound in bounds:
        peers = PeerCoordinator(cfg.p2p_neighbours, cfg.p2p_neighbour_k, bound, cfg.peer_costs, cfg.p2p_beat_threshold)
        peers.refresh(sums)
        peers.certify(evidence)
        counts = []
        for c in clients:
            thresholds = peers.thresholds_of(c["cluster"]) if peers.enabled(c["cluster"]) else None
            tiers = query_tiers(c["test"], c["data"].test.x, tau, received[c["cluster"]], thresholds)
            asked = tiers[c["escalated"]] == LLM  # the escalated items that still go to the LLM
            answered = c["escalated"][asked]
            # ``score`` as the client runs it; the accept flags are not needed here
            counts.append(score(tiers, c["test"].drafts, answered, c["llm_final"][asked], np.zeros(len(answered), bool), c["data"].test.y))
        total = {key: sum(row[key] for row in counts) for key in counts[0]}
        n = total["num-examples"]
        out[bound] = {"accuracy": total["correct"] / n, "llm_rate": total["escalated"] / n,
                      "peer_answers": total["p2p-own"] + total["p2p-neighbour"], "peer_wrong": total["p2p-wrong"],
                      "clusters_tried": sum(peers.enabled(k) for k in peers.thresholds),
                      "certified_classes": sum(int(np.sum(t != NEVER)) for t in peers.thresholds.values())}
    return out


def rows(base, seed: int, runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per run, FedHLM without peers and under every bound; per bound, the curve's AUC and rate for
    80% of the SLM-to-cloud gap; and a check that the replay at the run's own bound is the run."""
    from fedhlm_app.config import validate
    from fedhlm_app.paths import results_dir

    table: dict[str, dict[str, float]] = {}
    curves: dict[str, list[list[float]]] = {"no P2P": [], **{f"bound {b}": [] for b in BOUNDS}}
    mismatch = 0.0
    for name, results in sorted(runs.items(), key=lambda kv: kv[1]["config"]["lambda"]):
        cfg = validate(results["config"])
        without = results["p2p"]["with_vs_without"]["without_p2p"]
        table[f"{name}, no P2P"] = {"accuracy": without["accuracy"], "llm_rate": without["llm_rate"]}
        curves["no P2P"].append([without["llm_rate"], without["accuracy"]])
        replayed = replay(cfg, results_dir(cfg.results_dir) / cfg.run_name, results["final_threshold"], tuple(sorted({*BOUNDS, cfg.p2p_max_error})))
        ran = replayed[cfg.p2p_max_error]
        mismatch = max(mismatch, abs(ran["accuracy"] - results["accuracy"]), abs(ran["llm_rate"] - results["llm_rate"]))
        for bound in BOUNDS:
            table[f"{name}, bound {bound}"] = replayed[bound]
            curves[f"bound {bound}"].append([replayed[bound]["llm_rate"], replayed[bound]["accuracy"]])
    main = runs[f"lambda={base.lambda_}"]
    slm, cloud = main["baselines"]["slm_only"]["accuracy"], main["baselines"]["cloud_only"]["accuracy"]
    for curve, points in curves.items():
        table[f"curve, {curve}"] = {"auc": ev.normalized_auc(np.array(points), slm, cloud),
                                    "rate_80": ev.rate_to_recover(np.array(points), slm, cloud, 0.8)}
    table["replay"] = {"largest_difference": mismatch}
    print(f"seed {seed} p2p: replay at the runs' own bound differs from the runs by at most {mismatch:.2e}", flush=True)
    return table


def section(base, table: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    seeds = table["replay"]["largest_difference"]["n"]
    lambdas = sorted(float(name.split("=")[1].split(",")[0]) for name in table if name.startswith("lambda=") and name.endswith(", no P2P"))
    fmt = lambda stat: f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"  # noqa: E731
    lines = ["Peers answer an uncertain item only where their answer is wrong at most `p2p-max-error` of the time, with 95% "
             "confidence, estimated on held-out calibration items (guide, \"Peer-to-peer resolution\"). A bound can only be "
             "certified where a cluster has enough held-out items of a class: with no error at all, about 2.7 / bound of them "
             "(54 at 0.05). A cluster tries peers only where, on the same held-out items, they are wrong less often than "
             "raising the threshold would be (`p2p-beat-threshold`). Every row with P2P is the same federated run as the row "
             "without it; only the routing of the uncertain items differs.", "",
             "## The trade-off curve with and without peers", "",
             "Normalised area between the accuracy / LLM-rate frontier of the lambda sweep and SLM-only, over the SLM-to-cloud "
             f"gap, and the LLM rate needed to recover 80% of that gap (lambda = {', '.join(str(x) for x in lambdas)}).", "",
             "| P2P | normalised AUC | LLM rate for 80% of the gap |", "|---|---|---|"]
    for curve in ("no P2P", *(f"bound {b}" for b in BOUNDS)):
        row = table[f"curve, {curve}"]
        label = "off" if curve == "no P2P" else f"p2p-max-error = {curve.split()[-1]}"
        lines.append(f"| {label} | {row['auc']['mean']:.3f} ± {row['auc']['std']:.3f} | {fmt(row['rate_80'])} |")
    default = f"lambda={base.lambda_}"
    lines += ["", f"## At the default operating point (lambda = {base.lambda_})", "",
              "| P2P | accuracy | LLM rate | peer answers (per seed) | wrong | clusters that tried peers |", "|---|---|---|---|---|---|"]
    off = table[f"{default}, no P2P"]
    lines.append(f"| off | {fmt(off['accuracy'])} | {fmt(off['llm_rate'])} | 0 | 0 | 0 |")
    for bound in BOUNDS:
        row = table[f"{default}, bound {bound}"]
        lines.append(f"| p2p-max-error = {bound} | {fmt(row['accuracy'])} | {fmt(row['llm_rate'])} | {row['peer_answers']['mean']:.1f} | "
                     f"{row['peer_wrong']['mean']:.1f} | {row['clusters_tried']['mean']:.1f} |")
    lines += ["", "## False reuse on the test items, per bound", "",
              f"Peer answers on the test items of every run of the sweep and every seed ({len(lambdas)} x {seeds} runs), the share "
              "the LLM (here: the label) contradicts, and its Wilson 95% interval.", "",
              "| p2p-max-error | peer answers | wrong | false reuse | Wilson 95% |", "|---|---|---|---|---|"]
    for bound in BOUNDS:
        answered = int(round(sum(table[f"lambda={lam}, bound {bound}"]["peer_answers"]["mean"] for lam in lambdas) * seeds))
        wrong = int(round(sum(table[f"lambda={lam}, bound {bound}"]["peer_wrong"]["mean"] for lam in lambdas) * seeds))
        lo, hi = wilson_interval(wrong, answered)
        rate = f"{100 * wrong / answered:.2f}" if answered else "-"
        lines.append(f"| {bound} | {answered} | {wrong} | {rate} | {100 * lo:.2f} - {100 * hi:.2f} |")
    lines += ["", "Replay check: at each run's own bound, the replay differs from the run by at most "
              f"{table['replay']['largest_difference']['mean']:.1e} in accuracy and LLM rate (mean over seeds of the largest difference).", ""]
    return lines

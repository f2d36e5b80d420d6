"""The evaluation harness: the paper's experiments, every baseline, trade-off curves, seeds.

    python -m fedhlm_app.tools.experiments [--seeds 42 43 44] [--out results/experiments] [--quick]

Every federated configuration is a real run of the ServerApp and ClientApps,
driven in-process (``fedhlm_app.tools.inprocess``) so that dozens of runs fit in
minutes; all of them read the same cached SLM features. Routing baselines that
need no federated learning (static thresholds, U-HLM's rule, the random and
oracle routers) are computed from per-item outcomes reconstructed from the main
run's learned head. Writes ``report.md``, ``experiments.json`` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhlm_app.config import RunConfig, validate
from fedhlm_app.reporting import evaluation as ev
from fedhlm_app.reporting import frontier
from fedhlm_app.tools import p2p_study
from fedhlm_app.tools.launch import ROOT, resolved_config

ALPHAS = [0.05, 0.1, 0.3, 0.5, 1.0, 10.0, float("inf")]
LAMBDAS = [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.375, 0.45, 0.55]
STATIC_TAUS = np.round(np.linspace(0.0, 1.0, 101), 2)
SHIFTS = [0.0, 0.25, 0.5, 0.75, 1.0]


def variants(quick: bool) -> dict[str, dict[str, Any]]:
    """Name -> run-config overrides of each federated configuration (per seed)."""
    runs: dict[str, dict[str, Any]] = {
        "hierarchical": {},
        "flat": {"edge-strategy": "none"},
        "local-only": {"personalization-alpha": 0.0},
    }
    for alpha in ALPHAS[:: 3 if quick else 1]:
        if alpha != 0.5:
            # Extreme skew leaves some clients (almost) without data; allow it rather than resample.
            runs[f"alpha={alpha}"] = {"dirichlet-alpha": alpha, "min-partition-size": 0}
    for lam in LAMBDAS[:: 3 if quick else 1]:
        if lam != 0.375:
            runs[f"lambda={lam}"] = {"lambda": lam}
    return {**runs, **shift_variants(quick)}


def shift_variants(quick: bool) -> dict[str, dict[str, Any]]:
    """The query-shift sweep: each shift with the causal label prior (shift 0 is the main run) and without any prior."""
    runs: dict[str, dict[str, Any]] = {}
    for shift in SHIFTS[:: 4 if quick else 1]:
        if shift:
            runs[f"shift={shift}"] = {"query-shift": shift}
        runs[f"shift={shift}-no-prior"] = {"query-shift": shift, "local-label-prior": False}
    return runs


def prior_only_accuracy(cfg: RunConfig) -> float:
    """Accuracy of answering every query with the client's most frequent training class (no model at all)."""
    from fedhlm_app.data.partition import configured_partitions
    from fedhlm_app.slm.local_data import dataset

    ds = dataset(cfg)
    correct = total = 0
    for part in configured_partitions(ds.train.labels, ds.test.labels, cfg.num_clients, cfg):
        majority = np.bincount(ds.train.labels[np.r_[part.fit, part.calibration]], minlength=ds.num_classes).argmax()
        correct += int(np.sum(ds.test.labels[part.test] == majority))
        total += len(part.test)
    return correct / max(total, 1)


def query_shift_rows(base: RunConfig, seed: int, runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per shift of the sweep: accuracy and LLM rate with the causal prior and without a prior, and the prior-only baseline."""
    rows = {}
    for shift in sorted({float(k.split("=")[1].removesuffix("-no-prior")) for k in runs if k.startswith("shift=")}):
        with_prior = runs["hierarchical"] if shift == 0 else runs[f"shift={shift}"]
        without = runs[f"shift={shift}-no-prior"]
        rows[str(shift)] = {
            "prior_accuracy": with_prior["accuracy"], "prior_llm_rate": with_prior["llm_rate"],
            "no_prior_accuracy": without["accuracy"], "no_prior_llm_rate": without["llm_rate"],
            "prior_only_accuracy": prior_only_accuracy(base.replace(seed=seed, query_shift=shift)),
            "adapted_queries": with_prior["adapted_queries"],
        }
    return rows


def query_shift_section(table: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The sweep's table (mean ± std over seeds) with how to read it."""
    lines = [
        "## Query shift: the local label prior when queries leave the client's own mix", "",
        "Each client's query labels are drawn from (1 - shift) x its train label mix + shift x the pooled mix "
        "(`query-shift`; 0: a device asked about what it was trained on, 1: every device asked like the pooled data). "
        "The causal prior re-weights each query to a mix between the client's own and the pooled one, the closest to the pooled mix "
        "among those that explain the queries seen almost as well as the best (a likelihood-ratio confidence region), "
        "estimated from the queries before it (no look-ahead); "
        "prior-only answers every query with the client's most frequent training class, with no model: what the label "
        "mix alone is worth.", "",
        "| shift | accuracy, causal prior | LLM rate, causal prior | accuracy, no prior | LLM rate, no prior | "
        "causal - no prior (points) | prior-only accuracy | queries under an estimated mix |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shift, row in table.items():
        gap = row["gap"]
        lines.append(f"| {shift} | {_fmt(row['prior_accuracy'])} | {_fmt(row['prior_llm_rate'])} | {_fmt(row['no_prior_accuracy'])} | "
                     f"{_fmt(row['no_prior_llm_rate'])} | {gap['mean'] * 100:+.2f} ± {gap['std'] * 100:.2f} | "
                     f"{_fmt(row['prior_only_accuracy'])} | {_fmt(row['adapted_queries'])} |")
    return lines + [""]


def combine_query_shift(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    return {shift: {**row, "gap": _stats([s[shift]["prior_accuracy"] - s[shift]["no_prior_accuracy"] for s in per_seed])}
            for shift, row in _table_stats(per_seed).items()}


def _run(base: RunConfig, name: str, overrides: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    from fedhlm_app.tools.inprocess import run_inprocess

    cfg = validate({**base.as_dict(), **overrides, "seed": seed, "run-name": f"{name}-seed{seed}".replace("=", "-"),
                    "results-dir": str(out / "runs"), "overwrite": True})  # the harness's own runs: a rerun replaces them
    started = time.monotonic()
    run_inprocess(cfg.as_dict())
    results = json.loads((out / "runs" / cfg.run_name / "results.json").read_text())
    results["harness_wall_s"] = time.monotonic() - started
    return results


def _seed_runs(base: RunConfig, runs_cfg: dict[str, dict[str, Any]], seed: int, out: Path) -> dict[str, dict[str, Any]]:
    """Every configuration's run at one seed, each reported on one line as it finishes."""
    runs = {}
    for name, overrides in runs_cfg.items():
        runs[name] = _run(base, name, overrides, seed, out)
        print(f"seed {seed} {name}: accuracy {runs[name]['accuracy']:.4f}, LLM rate {runs[name]['llm_rate']:.4f} "
              f"({runs[name]['harness_wall_s']:.0f} s)", flush=True)
    return runs


def item_outcomes(cfg: RunConfig, run_dir: Path) -> dict[str, np.ndarray]:
    """Per-item outcomes of a finished run, computed by the clients' own code from its saved model:
    each client's data (``local_data``), the head's outputs with the label prior (``head_outputs``)
    and their uncertainty and drafts (``Routing.of``); the oracle's answer on every test item (as
    under cloud-only) and its rejection probability beta on every calibration item."""
    from fedhlm_app.oracle.base import EscalationBatch, make_oracle, verify_safely
    from fedhlm_app.paths import cache_dir
    from fedhlm_app.reporting.results import SavedModel
    from fedhlm_app.routing.router import Routing
    from fedhlm_app.routing.speculative import rejection_probability
    from fedhlm_app.slm.finetune import EncoderTuner
    from fedhlm_app.slm.head import head_from_config
    from fedhlm_app.slm.local_data import Placement, dataset, local_data, local_texts
    from fedhlm_app.slm.predict import head_outputs

    model = SavedModel.load(run_dir / "model.npz")
    data_set = dataset(cfg)
    oracle = make_oracle(cfg, data_set)
    encoder = ""
    if model.encoder:  # the run fine-tuned the encoder: featurize with it (the clients' checkpoint, same digest)
        tuner = EncoderTuner(cfg.slm_model, cfg.encoder_layers, data_set.num_classes).set_arrays(model.encoder)
        encoder = str(tuner.install(cache_dir(cfg.cache_dir)))
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("p", "u", "slm", "llm", "client", "p_cal", "y_cal", "u_cal", "beta_cal")}
    for pid in range(cfg.num_clients):
        placement = Placement.of({"partition-id": pid, "num-partitions": cfg.num_clients}, cfg)
        data = local_data(cfg, placement, encoder)
        own = local_texts(cfg, placement).own_label_counts() if model.label_counts is not None else None
        head = head_from_config(cfg, data.dim, data.num_classes).set_params(model.head)
        probs = head_outputs(head, data, own, model.label_counts).probs
        test, calibration = Routing.of(probs["test"], cfg.uncertainty), Routing.of(probs["calibration"], cfg.uncertainty)
        every_item = EscalationBatch(np.arange(len(data.test)), data.test.texts, test.probs, test.drafts)
        out["p"].append(test.probs)
        out["u"].append(test.uncertainty)
        out["slm"].append(test.drafts == data.test.y)
        out["llm"].append(verify_safely(oracle, every_item).final_classes(test.drafts) == data.test.y)
        out["client"].append(np.full(len(test.drafts), pid))
        out["p_cal"].append(calibration.probs)
        out["y_cal"].append(data.calibration.y)
        out["u_cal"].append(calibration.uncertainty)
        out["beta_cal"].append(rejection_probability(calibration.probs, oracle.distribution(data.calibration.texts), calibration.drafts))
    return {k: np.concatenate(v) for k, v in out.items()}


def _policy(results: dict[str, Any], key: str) -> dict[str, float]:
    """accuracy / LLM rate / bytes of one policy of one run, plus the worst client for FedHLM."""
    if key in ("fedhlm", "fedhlm_no_p2p"):
        src = results if key == "fedhlm" else results["p2p"]["with_vs_without"]["without_p2p"]
        row = {"accuracy": src["accuracy"], "llm_rate": src["llm_rate"], "llm_bytes": results["communication"]["inference_llm_bytes"][key]}
        if key == "fedhlm":
            row["worst_client_accuracy"] = min(c["accuracy"] for c in results["clients"])
            row["worst_client_llm_rate"] = max(c["llm_rate"] for c in results["clients"])
            row["local_rate"], row["p2p_rate"] = results["local_rate"], results["p2p_rate"]
            row["final_tau"] = results["final_threshold"]
        return row
    base = results["baselines"][key]
    return {"accuracy": base["accuracy"], "llm_rate": base["llm_rate"], "llm_bytes": results["communication"]["inference_llm_bytes"][key]}


def analyse_seed(runs: dict[str, dict[str, Any]], items: dict[str, np.ndarray], bytes_per_item: float) -> dict[str, Any]:
    """Every table row and curve metric for one seed."""
    main = runs["hierarchical"]
    slm_acc, cloud_acc = float(items["slm"].mean()), float(items["llm"].mean())
    ours_rate = main["llm_rate"]
    rows = {
        "SLM only": _policy(main, "slm_only"),
        "cloud only": _policy(main, "cloud_only"),
        "static threshold (tau={:.2f})".format(main["baselines"]["static_threshold"]["tau"]): _policy(main, "static_threshold"),
    }
    tau_u, a, b = ev.uhlm_threshold(items["u_cal"], items["beta_cal"])
    esc = items["u"] > tau_u
    rows["U-HLM rule (-b/a)"] = {"accuracy": ev.accuracy_at(esc, items["slm"], items["llm"]), "llm_rate": float(esc.mean()),
                                 "llm_bytes": float(esc.sum() * bytes_per_item), "tau": tau_u, "a": a, "b": b}
    with_peers = main["p2p"]["enabled"]
    for name, key in (("local-only", "local-only"), ("flat FedAvg", "flat"), ("hierarchical FedAvg (ours)", "hierarchical")):
        if with_peers:
            rows[f"{name} + P2P"] = _policy(runs[key], "fedhlm")
            rows[f"{name}, no P2P"] = _policy(runs[key], "fedhlm_no_p2p")
        else:
            rows[name] = _policy(runs[key], "fedhlm")
    rows["random router @ ours"] = {"accuracy": ev.random_router_accuracy(items["slm"], items["llm"], ours_rate), "llm_rate": ours_rate,
                                    "llm_bytes": ours_rate * len(items["u"]) * bytes_per_item}
    oracle_esc = ev.oracle_router(items["slm"], items["llm"], ours_rate)
    rows["oracle router @ ours"] = {"accuracy": ev.accuracy_at(oracle_esc, items["slm"], items["llm"]), "llm_rate": float(oracle_esc.mean()),
                                    "llm_bytes": float(oracle_esc.sum() * bytes_per_item)}

    lam_runs = sorted([r for k, r in runs.items() if k.startswith("lambda=")] + [main], key=lambda r: r["config"]["lambda"])
    curves = {
        "ours (lambda sweep)": np.array([[r["llm_rate"], r["accuracy"]] for r in lam_runs]),
        **({"ours without P2P (lambda sweep)": np.array(
            [[w["llm_rate"], w["accuracy"]] for w in (r["p2p"]["with_vs_without"]["without_p2p"] for r in lam_runs)]
        )} if with_peers else {}),
        "static threshold sweep": ev.threshold_curve(items["u"], items["slm"], items["llm"], STATIC_TAUS),
        "random router": np.array([[r, ev.random_router_accuracy(items["slm"], items["llm"], r)] for r in np.linspace(0, 1, 21)]),
        "oracle router": np.array([[r, ev.accuracy_at(ev.oracle_router(items["slm"], items["llm"], r), items["slm"], items["llm"])] for r in np.linspace(0, 0.3, 31)]),
    }
    curve_metrics = {
        name: {
            "auc": ev.normalized_auc(c, slm_acc, cloud_acc),
            "rate_50": ev.rate_to_recover(c, slm_acc, cloud_acc, 0.5),
            "rate_80": ev.rate_to_recover(c, slm_acc, cloud_acc, 0.8),
        }
        for name, c in curves.items()
    }
    alpha_runs = [r for k, r in runs.items() if k.startswith("alpha=") or k == "hierarchical"]
    alphas = {str(_alpha(r)): _policy(r, "fedhlm") for r in sorted(alpha_runs, key=_alpha)}
    return {
        "rows": rows,
        "curves": {k: v.tolist() for k, v in curves.items()},
        "lambda_bytes": [[r["communication"]["inference_llm_bytes"]["fedhlm"], r["accuracy"]] for r in lam_runs],
        "curve_metrics": curve_metrics,
        "alphas": alphas,
        "thresholds": main["thresholds"],
        "slm_acc": slm_acc,
        "cloud_acc": cloud_acc,
    }


def _alpha(results: dict[str, Any]) -> float:
    return float(results["config"]["dirichlet-alpha"])  # "inf" (IID) is stored as a string


def _stats(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": len(arr)}


def combine(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every number in the tables."""
    def table(key: str) -> dict[str, dict[str, dict[str, float]]]:
        names = per_seed[0][key]
        return {
            name: {m: _stats([s[key][name][m] for s in per_seed]) for m in per_seed[0][key][name] if isinstance(per_seed[0][key][name][m], (int, float))}
            for name in names
        }
    combined = {"rows": table("rows"), "curve_metrics": table("curve_metrics"), "alphas": table("alphas"), "frontier": table("frontier")}
    for name in combined["frontier"]:  # the per-measure numbers, one level down
        combined["frontier"][name]["measures"] = {
            measure: {m: _stats([s["frontier"][name]["measures"][measure][m] for s in per_seed]) for m in numbers}
            for measure, numbers in per_seed[0]["frontier"][name]["measures"].items()
        }
    return combined


def _fmt(stat: dict[str, float], pct: bool = True) -> str:
    if pct:
        return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def plot(per_seed: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = per_seed[0]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, s in enumerate(per_seed):
        rounds = s["thresholds"]["rounds"]
        xs = [r["round"] for r in rounds]
        ax.plot(xs, s["thresholds"]["global"], "k-", lw=2, alpha=0.8, label="global" if i == 0 else None)
        for c, taus in s["thresholds"]["clusters"].items():
            ax.plot(xs, taus, lw=0.8, alpha=0.5, label=f"cluster {c}" if i == 0 else None)
    loss_ax = ax.twinx()
    for i, s in enumerate(per_seed):
        rounds = s["thresholds"]["rounds"]
        loss_ax.plot([r["round"] for r in rounds], [r["loss"] for r in rounds], "r--", lw=0.8, label="local loss" if i == 0 else None)
    ax.set_xlabel("threshold round"), ax.set_ylabel("threshold tau"), loss_ax.set_ylabel("mean local loss", color="r")
    ax.legend(fontsize=7, loc="upper right"), ax.set_title(f"Threshold convergence ({len(per_seed)} seeds)")
    fig.tight_layout(), fig.savefig(out / "convergence.png", dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in (("static threshold sweep", "b-"), ("random router", "k:"), ("oracle router", "g-"),
                        ("ours (lambda sweep)", "ro-"), ("ours without P2P (lambda sweep)", "m^--")):
        if name not in first["curves"]:  # the runs had P2P off
            continue
        c = np.array(first["curves"][name])
        ax.plot(c[:, 0], c[:, 1], style, lw=1.2, ms=4, label=name)
    ax.set_xlim(0, 0.5), ax.set_xlabel("LLM rate"), ax.set_ylabel("accuracy"), ax.legend(fontsize=8)
    ax.set_title(f"Accuracy vs LLM rate (seed {first['seed']})")
    fig.tight_layout(), fig.savefig(out / "tradeoff_rate.png", dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lb = np.array(first["lambda_bytes"])
    ax.plot(lb[:, 0] / 1000, lb[:, 1], "ro-", label="ours (lambda sweep)")
    st = np.array(first["curves"]["static threshold sweep"])
    ax.plot(st[:, 0] * first["num_items"] * first["bytes_per_item"] / 1000, st[:, 1], "b-", label="static threshold sweep")
    ax.set_xlim(0, 0.5 * first["num_items"] * first["bytes_per_item"] / 1000)
    ax.set_xlabel("uplink bytes to the LLM (kB)"), ax.set_ylabel("accuracy"), ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(out / "tradeoff_bytes.png", dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = list(first["alphas"])
    for metric, style in (("local_rate", "b-o"), ("llm_rate", "r-o"), ("accuracy", "k-o"), ("p2p_rate", "g-o")):
        means = [np.mean([s["alphas"][a][metric] for s in per_seed]) for a in labels]
        ax.plot(range(len(labels)), means, style, label=metric)
    ax.set_xticks(range(len(labels)), labels), ax.set_xlabel("Dirichlet alpha"), ax.legend(fontsize=8)
    ax.set_title("Non-IID stress test"), fig.tight_layout(), fig.savefig(out / "non_iid.png", dpi=120), plt.close(fig)


def frontier_section(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The report's frontier tables: one row per lever, then every uncertainty measure per lever."""
    pct = lambda stat: f"{100 * stat['mean']:.2f}"  # noqa: E731
    lines = ["## Frontier of SLM levers", "",
             "Each lever is a federated run per seed (same partitions, labels oracle). From its learned head, the "
             "r most uncertain test items go to the LLM: accuracy at r, and in brackets the oracle router's at the "
             "same r (it escalates exactly the SLM's mistakes). AUROC: the run's uncertainty as a detector of SLM "
             "errors. Learned point: the run's own policy. Wall: one run, in seconds.", "",
             "| lever | SLM only | AUROC | at 1% | at 2% | at 5% | at 10% | learned point: accuracy / LLM rate | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        at = [f"{_fmt(row[f'acc@{r:.0%}'])} ({pct(row[f'oracle@{r:.0%}'])})" for r in frontier.RATES]
        lines.append(f"| {frontier.LEVERS[name].description} | {_fmt(row['slm_accuracy'])} | {_fmt(row['auroc'], False)} | "
                     + " | ".join(at) + f" | {pct(row['accuracy'])} / {pct(row['llm_rate'])} | {row['wall_s']['mean']:.0f} |")
    measures = list(next(iter(rows.values()))["measures"])
    lines += ["", "Every uncertainty measure on the same learned heads: AUROC / accuracy with 5% of the items escalated. "
              "Temperature scaling fits one temperature to the calibration items' log loss (a sum over clients, so a "
              "federated fit gives the same value); U-HLM's temperature perturbation is its expected disagreement.", "",
              "| lever | " + " | ".join(measures) + " |", "|---" * (len(measures) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row['measures'][m]['auroc']['mean']:.3f} / {pct(row['measures'][m]['acc@5%'])}" for m in measures]
        lines.append(f"| {frontier.LEVERS[name].description} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(per_seed: list[dict[str, Any]], combined: dict[str, Any], out: Path, args: argparse.Namespace, wall_s: float, runs_cfg: dict[str, dict[str, Any]]) -> None:
    seeds = " ".join(str(s["seed"]) for s in per_seed)
    cmd = f"python -m fedhlm_app.tools.experiments --seeds {seeds}" + (" --quick" if args.quick else "") \
        + (f" --levers {' '.join(args.levers)}" if args.levers else "")
    lever_runs = sum(1 for name in combined["frontier"] if frontier.LEVERS[name].overrides)
    lines = [
        "# FedHLM evaluation report", "",
        f"Seeds {seeds} (partition and initialisation); every number is mean ± standard deviation over the seeds, "
        f"in percent unless marked. {len(per_seed[0]['runs'])} federated runs per seed plus {lever_runs} for the frontier "
        f"of SLM levers, {wall_s / 60:.1f} min in all. "
        f"Reproduce everything with `{cmd}` (or `make experiments" + (f" LEVERS=\"{' '.join(args.levers)}\"" if args.levers else "")
        + "`).", "",
        "## Baselines on the same test items", "",
        "| method | accuracy | LLM rate | worst-client accuracy | worst-client LLM rate | bytes to the LLM (kB) |", "|---|---|---|---|---|---|",
    ]
    for name, row in combined["rows"].items():
        worst_acc = _fmt(row["worst_client_accuracy"]) if "worst_client_accuracy" in row else "–"
        worst_llm = _fmt(row["worst_client_llm_rate"]) if "worst_client_llm_rate" in row else "–"
        lines.append(f"| {name} | {_fmt(row['accuracy'])} | {_fmt(row['llm_rate'])} | {worst_acc} | {worst_llm} | {row['llm_bytes']['mean'] / 1000:.1f} ± {row['llm_bytes']['std'] / 1000:.1f} |")
    uh = combined["rows"]["U-HLM rule (-b/a)"]
    with_peers = "hierarchical FedAvg (ours) + P2P" in combined["rows"]
    ours = "hierarchical + P2P" if with_peers else "hierarchical"
    lines += [
        "", "Flat and hierarchical FedAvg coincide: with sample-weighted means at both levels, the weighted mean of the "
        "edge means is the global weighted mean; they differ only in traffic (edge aggregates) and with robust or "
        "personalized rules. Worst-client columns are given where per-client results exist (the federated runs).",
        "", f"U-HLM's linear fit on the calibration items gives tau = {_fmt(uh['tau'], False)} (a = {_fmt(uh['a'], False)}, b = {_fmt(uh['b'], False)}).",
        f"Random and oracle routers escalate as many items as ours ({ours}); the oracle escalates exactly the items the SLM gets wrong and the LLM right.", "",
        "## Trade-off curves", "",
        "Normalised area between the accuracy/LLM-rate frontier and SLM-only over the SLM-to-cloud gap (0.5 = random router), "
        "and the LLM rate needed to recover 50% and 80% of that gap. Between measured points the frontier is a straight "
        "line, so a sweep with few points at high LLM rates is understated there; the lambda sweep runs lambda = "
        + ", ".join(str(x) for x in LAMBDAS) + f" (each a full federated run). Learned thresholds are thresholds on the same uncertainty ({per_seed[0]['uncertainty']}) "
        "as the static sweep, so without P2P their points lie on it: learning picks the operating point, it does not move the "
        "frontier.", "",
        "| router | normalised AUC | LLM rate for 50% of the gap | for 80% |", "|---|---|---|---|",
    ]
    for name, m in combined["curve_metrics"].items():
        lines.append(f"| {name} | {_fmt(m['auc'], False)} | {_fmt(m['rate_50'])} | {_fmt(m['rate_80'])} |")
    lines += ["", "![accuracy vs LLM rate](tradeoff_rate.png)", "", "![accuracy vs bytes](tradeoff_bytes.png)", "",
              "## Experiment 1: threshold convergence", ""]
    finals = [s["thresholds"]["global"] for s in per_seed]
    moves = [max(abs(np.diff(g[-10:]))) if len(g) > 10 else float("nan") for g in finals]
    lines += [f"Final global threshold {_fmt(_stats([g[-1] for g in finals]), False)}; the largest change over the last 10 rounds is "
              f"{max(moves):.2e}: the thresholds stabilise, they do not oscillate.", "", "![convergence](convergence.png)", "",
              f"## Experiment 2: non-IID stress test ({ours})", "",
              "| Dirichlet alpha | local resolution rate | P2P rate | LLM rate | accuracy |", "|---|---|---|---|---|"]
    below = None
    for alpha, row in combined["alphas"].items():
        lines.append(f"| {alpha} | {_fmt(row['local_rate'])} | {_fmt(row['p2p_rate'])} | {_fmt(row['llm_rate'])} | {_fmt(row['accuracy'])} |")
    for alpha in reversed(list(combined["alphas"])):
        if combined["alphas"][alpha]["local_rate"]["mean"] < 0.8 and below is None:
            below = alpha
    lines += ["", f"Local resolution drops below 80% at alpha = {below}." if below else
              "The local resolution rate stays at or above 80% for every alpha tested (0.05 to IID).", "", "![non-IID](non_iid.png)", "",
              "## Experiment 3: P2P ablation", ""]
    if with_peers:
        with_p2p, without = combined["rows"]["hierarchical FedAvg (ours) + P2P"], combined["rows"]["hierarchical FedAvg (ours), no P2P"]
        lines += [f"Without P2P the LLM rate is {_fmt(without['llm_rate'])}% against {_fmt(with_p2p['llm_rate'])}% with it, at accuracy "
                  f"{_fmt(without['accuracy'])}% against {_fmt(with_p2p['accuracy'])}%. The learned threshold does not compensate: "
                  "threshold learning always uses the LLM's verdicts (P2P is applied after the threshold, at inference), so both "
                  f"variants share the same threshold ({_fmt(with_p2p['final_tau'], False)}).", ""]
    else:
        lines += ["P2P is off in these runs (`p2p = false`, the default). Its own study, the lambda sweep with and without "
                  "peers under error bounds, is `--only p2p` (p2p.md).", ""]
    lines += frontier_section(combined["frontier"])
    lines += query_shift_section(combined["query_shift"])
    lines += ["## Reproduce", "", f"All runs: `{cmd}`. Each federated run is the app with these run-config overrides "
              "(`make run ARGS=\"...\"` runs the same configuration as a `flwr run` simulation; add `seed=N`):", ""]
    for name, overrides in {**runs_cfg, **{f"lever-{k}": frontier.LEVERS[k].overrides for k in combined["frontier"] if k != "default"}}.items():
        ov = " ".join(f"{k}={v!r}" for k, v in overrides.items()) or "(defaults, conf/paper.toml)"
        lines.append(f"- {name}: `{ov}`")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def chosen_levers(args: argparse.Namespace) -> list[str]:
    """The frontier levers to run, checked before any run starts."""
    if not args.levers:
        return list(frontier.QUICK_LEVERS if args.quick else frontier.MINILM_LEVERS)
    if args.levers == ["all"]:
        return list(frontier.LEVERS)
    unknown = [name for name in args.levers if name not in frontier.LEVERS]
    if unknown:
        raise SystemExit(f"--levers: unknown {unknown} (known: {', '.join(frontier.LEVERS)} or 'all')")
    return ["default"] + [name for name in args.levers if name != "default"]


def measure_lever(base: RunConfig, name: str, seed: int, out: Path, runs: dict[str, dict[str, Any]],
                  main_items: dict[str, np.ndarray]) -> dict[str, Any]:
    """One lever's frontier row for one seed; the default lever is the main (hierarchical) run."""
    overrides = frontier.LEVERS[name].overrides
    if overrides:
        results = _run(base, f"lever-{name}", overrides, seed, out)
        items = item_outcomes(validate({**base.as_dict(), **overrides, "seed": seed}), out / "runs" / results["config"]["run-name"])
    else:
        results, items = runs["hierarchical"], main_items
    row = frontier.frontier_row(items, results["config"]["uncertainty"])
    row.update({"accuracy": results["accuracy"], "llm_rate": results["llm_rate"], "wall_s": results["harness_wall_s"]})
    print(f"seed {seed} lever {name}: SLM {row['slm_accuracy']:.4f}, at 5% {row['acc@5%']:.4f} "
          f"(oracle {row['oracle@5%']:.4f}), AUROC {row['auroc']:.3f} ({row['wall_s']:.0f} s)", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--out", default=str(ROOT / "results" / "experiments"))
    parser.add_argument("--quick", action="store_true", help="fewer alphas, lambdas and levers (for tests)")
    parser.add_argument("--levers", nargs="+", metavar="LEVER", help="frontier levers to run: names of "
                        f"fedhlm_app.reporting.frontier.LEVERS or 'all' (default: {' '.join(frontier.MINILM_LEVERS)})")
    parser.add_argument("-c", "--run-config", action="append", default=[], help="overrides for every run, e.g. \"max-test-items=500\"")
    parser.add_argument("--only", choices=list(STUDIES),
                        help="run one study alone: the query-shift sweep (query_shift.md), the oracle sensitivity "
                             "(oracle_sensitivity.md), every strategy preset with and without hostile clients "
                             "(strategies.md), the lambda sweep with P2P under error bounds (p2p.md) or the defaults "
                             "on validation rows (validation.md)")
    parser.add_argument("--classifier", default="", help="oracle-sensitivity: also a classifier checkpoint as the LLM")
    parser.add_argument("--causal-lm", default="", metavar="MODEL",
                        help="oracle-sensitivity: also a causal LM as the LLM (smollm2, gemma3, a .gguf file or a checkpoint folder)")
    args = parser.parse_args(argv)
    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.WARNING)  # dozens of runs: keep only the harness's own lines
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = resolved_config([str(ROOT / "conf" / "paper.toml")], args.run_config)
    if args.only:
        return study_only(base, args, out)
    levers = chosen_levers(args)
    started = time.monotonic()
    runs_cfg = variants(args.quick)
    per_seed = []
    for seed in args.seeds:
        runs = _seed_runs(base, runs_cfg, seed, out)
        main_cfg = base.replace(seed=seed)
        items = item_outcomes(main_cfg, out / "runs" / f"hierarchical-seed{seed}")
        cloud = runs["hierarchical"]["baselines"]["cloud_only"]
        bytes_per_item = runs["hierarchical"]["communication"]["inference_llm_bytes"]["cloud_only"] / max(cloud["llm_items"], 1)
        seed_result = analyse_seed(runs, items, bytes_per_item)
        seed_result["frontier"] = {name: measure_lever(base, name, seed, out, runs, items) for name in levers}
        seed_result["query_shift"] = query_shift_rows(base, seed, runs)
        seed_result.update({"seed": seed, "runs": list(runs), "bytes_per_item": bytes_per_item, "num_items": len(items["u"]),
                            "uncertainty": main_cfg.uncertainty})
        per_seed.append(seed_result)
    combined = combine(per_seed)
    combined["query_shift"] = combine_query_shift([s["query_shift"] for s in per_seed])
    wall = time.monotonic() - started
    (out / "experiments.json").write_text(json.dumps({"per_seed": per_seed, "combined": combined, "wall_time_s": wall,
                                                       "runs": {k: {kk: str(vv) for kk, vv in v.items()} for k, v in runs_cfg.items()}}, indent=1) + "\n")
    plot(per_seed, out)
    write_report(per_seed, combined, out, args, wall, runs_cfg)
    print(f"report: {out / 'report.md'} ({wall / 60:.1f} min)")
    return 0


SENSITIVITY_ACCURACIES = [0.95, 0.9, 0.8]


def oracle_variants(classifier: str, causal_lm: str) -> dict[str, dict[str, Any]]:
    """The main configuration with LLMs of decreasing quality."""
    runs: dict[str, dict[str, Any]] = {"hierarchical": {}}
    for accuracy in SENSITIVITY_ACCURACIES:
        runs[f"noisy-{accuracy}"] = {"oracle": "noisy-labels", "oracle-accuracy": accuracy}
    if classifier:
        runs["classifier"] = {"oracle": "classifier", "oracle-model": classifier}
    if causal_lm:
        runs["causal-lm"] = {"oracle": "causal-lm", "oracle-model": causal_lm}
    return runs


def oracle_rows(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per LLM: its own accuracy (cloud-only), the learned threshold, LLM use and the hybrid's accuracy."""
    names = {"hierarchical": "labels (ground truth)", **{f"noisy-{a}": f"noisy labels, {a:.0%} right" for a in SENSITIVITY_ACCURACIES},
             "classifier": "classifier (MiniLM fine-tuned)", "causal-lm": "causal LM (few-shot prompt)"}
    return {names[name]: {
        "llm_accuracy": r["baselines"]["cloud_only"]["accuracy"], "slm_accuracy": r["baselines"]["slm_only"]["accuracy"],
        "final_tau": r["final_threshold"], "llm_rate": r["llm_rate"], "training_llm_items": r["llm_use"]["training_items"],
        "reduction_total": r["llm_reduction_total"], "accuracy": r["accuracy"],
    } for name, r in runs.items()}


def oracle_section(table: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = ["## Oracle sensitivity: threshold learning when the LLM is wrong", "",
             "The main configuration with LLMs of decreasing quality. The LLM's verdicts are the training signal "
             "(an item's rejection probability beta), so a wrong LLM both teaches the threshold and answers the "
             "escalated items.", "",
             "| LLM | LLM accuracy (cloud only) | SLM only | learned threshold | LLM rate | training LLM items | "
             "LLM reduction, training included | hybrid accuracy |", "|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {name} | {_fmt(row['llm_accuracy'])} | {_fmt(row['slm_accuracy'])} | {_fmt(row['final_tau'], False)} | "
                     f"{_fmt(row['llm_rate'])} | {row['training_llm_items']['mean']:.0f} | {_fmt(row['reduction_total'])} | "
                     f"{_fmt(row['accuracy'])} |")
    return lines + [""]


LLM_BUDGET = 0.05  # the paper's yardstick: more than 95% fewer transmissions than cloud-only
TUNED = {"lambda": [0.2, 0.3, 0.375, 0.45, 0.55], "uncertainty": ["margin", "entropy"], "kappa": [20.0, 40.0, 80.0],
         "tau-init": [0.8, 0.9, 1.0]}


def validation_variants(base: RunConfig) -> dict[str, dict[str, Any]]:
    """One knob at a time around the defaults, every run answering validation rows of train (the test rows stay unread)."""
    runs: dict[str, dict[str, Any]] = {"defaults": {"query-pool": "validation"}}
    for key, values in TUNED.items():
        for value in values:
            if value != base.as_dict()[key]:
                runs[f"{key}={value}"] = {"query-pool": "validation", key: value}
    return runs


def validation_rows(base: RunConfig, seed: int, runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    defaults = base.as_dict()
    rows = {}
    for key, values in TUNED.items():
        for value in values:
            r = runs["defaults"] if value == defaults[key] else runs[f"{key}={value}"]
            rows[f"{key}={value}"] = {"accuracy": r["accuracy"], "llm_rate": r["llm_rate"], "reduction_total": r["llm_reduction_total"]}
    return {**rows, **prior_replay_rows(base.replace(seed=seed), runs["defaults"])}


PRIOR_BOUNDS = [4.0, 6.0, 10.0]  # candidate ``label_prior.CONFIDENCE_NATS``
PRIOR_FLOOR = -0.001  # a bound may cost at most this much accuracy against no prior, on the mean, at any shift


def prior_replay_rows(cfg: RunConfig, run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The causal prior's confidence bound on validation streams at every shift of the sweep, replayed
    from one finished validation run (its head and each client's learned threshold; no federated rerun,
    P2P not replayed: an uncertain query counts as escalated and answered right, as by the labels oracle).
    Per shift and bound: the accuracy gain over no prior and the LLM rate."""
    from fedhlm_app.reporting.results import SavedModel
    from fedhlm_app.routing.router import Routing
    from fedhlm_app.slm.head import head_from_config
    from fedhlm_app.slm.label_prior import calibrated, causal_priors, prior_of
    from fedhlm_app.slm.local_data import Placement, local_data, local_texts

    run_dir = Path(run["config"]["results-dir"]) / run["run_name"]
    model = SavedModel.load(run_dir / "model.npz")
    taus = {c["partition_id"]: c["tau"] for c in run["clients"]}
    rows = {}
    for shift in SHIFTS:
        shifted_cfg = validate({**cfg.as_dict(), **{k: run["config"][k] for k in ("query-pool", "validation-fraction")},
                                "query-shift": shift})
        right, escalated, n = np.zeros(len(PRIOR_BOUNDS) + 1), np.zeros(len(PRIOR_BOUNDS) + 1), 0
        for pid in range(cfg.num_clients):
            placement = Placement.of({"partition-id": pid, "num-partitions": cfg.num_clients}, shifted_cfg)
            data = local_data(shifted_cfg, placement, "")
            head = head_from_config(shifted_cfg, data.dim, data.num_classes).set_params(model.head)
            probs, labelled = head.predict_proba(data.test.inputs), head.predict_proba(data.calibration.inputs)
            own, pooled = prior_of(local_texts(shifted_cfg, placement).own_label_counts()), prior_of(model.label_counts)
            queries = calibrated(probs, labelled, data.calibration.y, own, pooled)
            for i, bound in enumerate([None, *PRIOR_BOUNDS]):
                adapted = probs if bound is None else probs * causal_priors(queries, own, pooled, bound) / pooled
                routing = Routing.of(adapted / adapted.sum(axis=1, keepdims=True), cfg.uncertainty)
                to_llm = routing.uncertainty > taus[pid]
                right[i] += np.sum(to_llm | (routing.drafts == data.test.y))
                escalated[i] += to_llm.sum()
            n += len(data.test.y)
        for i, bound in enumerate(PRIOR_BOUNDS):
            rows[f"prior@{shift}:{bound}"] = {"gain": (right[i + 1] - right[0]) / n, "llm_rate": escalated[i + 1] / n,
                                              "no_prior_llm_rate": escalated[0] / n}
    return rows


def prior_bound_section(table: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The confidence bound of the causal prior: gain over no prior per shift, and the bound the rule picks."""
    gains = {b: [table[f"prior@{s}:{b}"]["gain"]["mean"] for s in SHIFTS] for b in PRIOR_BOUNDS}
    safe = [b for b in PRIOR_BOUNDS if min(gains[b]) >= PRIOR_FLOOR] or PRIOR_BOUNDS
    chosen = max(safe, key=lambda b: np.mean(gains[b]))
    lines = ["## The label prior's confidence bound, on validation streams", "",
             "Each client's validation queries drawn at each query shift (as in the report's query-shift sweep) and answered "
             "by the `defaults` run's head and learned thresholds, with the causal prior at each confidence bound "
             "(`CONFIDENCE_NATS` in `fedhlm_app/slm/label_prior.py`) and without a prior; replayed from the saved model, "
             "P2P not replayed. The rule: the largest mean gain over the shifts among the bounds that are, on the mean, "
             f"never more than {-100 * PRIOR_FLOOR:.1f} points below no prior at any shift.", "",
             "| shift | LLM rate, no prior | " + " | ".join(f"{b:g} nats: gain (points) / LLM rate" for b in PRIOR_BOUNDS) + " |",
             "|---|---|" + "---|" * len(PRIOR_BOUNDS)]
    for shift in SHIFTS:
        cells = [f"{100 * table[f'prior@{shift}:{b}']['gain']['mean']:+.2f} ± {100 * table[f'prior@{shift}:{b}']['gain']['std']:.2f}"
                 f" / {_fmt(table[f'prior@{shift}:{b}']['llm_rate'])}" for b in PRIOR_BOUNDS]
        lines.append(f"| {shift} | {_fmt(table[f'prior@{shift}:{PRIOR_BOUNDS[0]}']['no_prior_llm_rate'])} | " + " | ".join(cells) + " |")
    lines += ["", f"Chosen: {chosen:g} nats (mean gain over the shifts: "
              + ", ".join(f"{b:g}: {100 * np.mean(gains[b]):+.2f}" for b in PRIOR_BOUNDS) + " points).", ""]
    return lines


def validation_section(base: RunConfig, table: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Per knob: validation accuracy and LLM rate of each value, the value the rule picks and the default."""
    defaults = base.as_dict()
    lines = ["## Run-config defaults chosen on validation rows", "",
             f"Every run answers queries drawn from {defaults['validation-fraction']:.0%} of the train rows, held out from every "
             "client (`query-pool = \"validation\"`); the test rows are not read. One knob at a time moves from the defaults. "
             f"The rule: the highest validation accuracy among the values whose LLM rate stays within {LLM_BUDGET:.0%} (the "
             "paper's more than 95% fewer transmissions); ties go to fewer LLM calls at inference, then in all.", "",
             "| knob | value | validation accuracy | LLM rate | LLM reduction, training included | chosen | default |",
             "|---|---|---|---|---|---|---|"]
    for key, values in TUNED.items():
        names = [f"{key}={v}" for v in values]
        within = [n for n in names if table[n]["llm_rate"]["mean"] <= LLM_BUDGET] or names
        chosen = max(within, key=lambda n: (round(table[n]["accuracy"]["mean"], 4), -round(table[n]["llm_rate"]["mean"], 4),
                                            table[n]["reduction_total"]["mean"]))
        for value, name in zip(values, names):
            row = table[name]
            lines.append(f"| {key} | {value} | {_fmt(row['accuracy'])} | {_fmt(row['llm_rate'])} | {_fmt(row['reduction_total'])} | "
                         f"{'yes' if name == chosen else ''} | {'yes' if value == defaults[key] else ''} |")
    return lines + [""]


STRATEGY_PRESETS = ROOT / "conf" / "strategies"
HOSTILE_PER_CLUSTER = 2


def strategy_variants(base: RunConfig, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every preset of ``conf/strategies/``, as it is and with ``HOSTILE_PER_CLUSTER`` hostile clients per cluster."""
    runs: dict[str, dict[str, Any]] = {}
    for preset in sorted(STRATEGY_PRESETS.glob("*.toml")):
        values = tomllib.loads(preset.read_text())
        runs[preset.stem] = values
        runs[f"{preset.stem}-poisoned"] = {**values, "hostile-clients": HOSTILE_PER_CLUSTER}
    return runs


def strategy_rows(base: RunConfig, seed: int, runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {name: {"accuracy": r["accuracy"], "llm_rate": r["llm_rate"], "worst_client_accuracy": min(c["accuracy"] for c in r["clients"]),
                   "training_mb": r["communication"]["training_bytes"] / 1e6, "final_tau": r["final_threshold"]}
            for name, r in runs.items()}


def strategy_section(base: RunConfig, table: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = ["## Aggregation strategies, with and without hostile clients", "",
             f"Each preset of `conf/strategies/` on the main configuration; \"poisoned\": the first {HOSTILE_PER_CLUSTER} clients of "
             "every cluster (of 5) send, every round, a threshold of 1.0 and their head update reversed and scaled by 10 "
             "(`hostile-clients`, `fedhlm_app/fl/attacks.py`): valid-looking updates that stop escalation and push the head uphill. "
             "Training bytes: every message of training, as serialized.", "",
             "| preset | edge | cloud | accuracy | LLM rate | worst client | training MB | accuracy, poisoned | LLM rate, poisoned | "
             "worst client, poisoned | learned tau, poisoned |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset in sorted(STRATEGY_PRESETS.glob("*.toml")):
        values = tomllib.loads(preset.read_text())
        clean, hostile = table[preset.stem], table[f"{preset.stem}-poisoned"]
        lines.append(f"| {preset.stem} | {values['edge-strategy']} | {values['cloud-strategy']} | {_fmt(clean['accuracy'])} | "
                     f"{_fmt(clean['llm_rate'])} | {_fmt(clean['worst_client_accuracy'])} | {clean['training_mb']['mean']:.1f} | "
                     f"{_fmt(hostile['accuracy'])} | {_fmt(hostile['llm_rate'])} | {_fmt(hostile['worst_client_accuracy'])} | "
                     f"{_fmt(hostile['final_tau'], False)} |")
    return lines + [""]


@dataclass(frozen=True)
class Study:
    """A study that ``--only`` runs alone: its runs, its per-seed rows, their combination and its report section."""

    stem: str
    title: str
    variants: Callable[[RunConfig, argparse.Namespace], dict[str, dict[str, Any]]]
    rows: Callable[[RunConfig, int, dict[str, dict[str, Any]]], dict[str, dict[str, float]]]
    combine: Callable[[list[dict[str, dict[str, float]]]], dict[str, dict[str, dict[str, float]]]]
    section: Callable[[RunConfig, dict[str, dict[str, dict[str, float]]]], list[str]]


STUDIES = {
    "query-shift": Study("query_shift", "FedHLM query-shift sweep", lambda base, args: {"hierarchical": {}, **shift_variants(args.quick)},
                         query_shift_rows, combine_query_shift, lambda base, table: query_shift_section(table)),
    "oracle-sensitivity": Study("oracle_sensitivity", "FedHLM oracle sensitivity", lambda base, args: oracle_variants(args.classifier, args.causal_lm),
                                lambda base, seed, runs: oracle_rows(runs), lambda per_seed: _table_stats(per_seed),
                                lambda base, table: oracle_section(table)),
    "strategies": Study("strategies", "FedHLM aggregation strategies", strategy_variants, strategy_rows,
                        lambda per_seed: _table_stats(per_seed), strategy_section),
    "p2p": Study("p2p", "FedHLM peer-to-peer reuse under an error bound",
                 lambda base, args: p2p_study.variants(LAMBDAS[:: 3 if args.quick else 1], base.lambda_),
                 p2p_study.rows, lambda per_seed: _table_stats(per_seed), p2p_study.section),
    "validation": Study("validation", "FedHLM defaults on validation rows", lambda base, args: validation_variants(base),
                        validation_rows, lambda per_seed: _table_stats(per_seed),
                        lambda base, table: validation_section(base, table) + prior_bound_section(table)),
}


def _table_stats(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    return {name: {m: _stats([s[name][m] for s in per_seed]) for m in per_seed[0][name]} for name in per_seed[0]}


def study_only(base: RunConfig, args: argparse.Namespace, out: Path) -> int:
    """One study alone (``--only``): ``<study>.md`` and ``<study>.json`` in ``out``."""
    study = STUDIES[args.only]
    started = time.monotonic()
    runs_cfg = study.variants(base, args)
    per_seed = []
    for seed in args.seeds:
        runs = _seed_runs(base, runs_cfg, seed, out)
        per_seed.append(study.rows(base, seed, runs))
    table = study.combine(per_seed)
    wall = time.monotonic() - started
    seeds = " ".join(str(s) for s in args.seeds)
    extra = "".join(f" --{flag} {value}" for flag, value in (("classifier", args.classifier), ("causal-lm", args.causal_lm)) if value)
    extra += " --quick" if args.quick else ""
    extra += "".join(f' -c "{override}"' for override in args.run_config)
    lines = [f"# {study.title}", "", f"Seeds {seeds}; mean ± standard deviation over the seeds, in percent unless marked; "
             f"{len(runs_cfg)} federated runs per seed, {wall / 60:.1f} min. Reproduce with "
             f"`python -m fedhlm_app.tools.experiments --only {args.only} --seeds {seeds}{extra}`.", "", *study.section(base, table)]
    (out / f"{study.stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{study.stem}.json").write_text(json.dumps({"per_seed": per_seed, "combined": table, "wall_time_s": wall}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

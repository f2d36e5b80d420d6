"""The accuracy / LLM-rate frontier of SLM levers (issue 9), measured side by side.

    python bench/frontier.py [--seeds 42 43 44] [--levers linear-entropy mlp256-margin ...]

Each lever is a federated run of the paper's setting (20 clients, 4 clusters, alpha 0.5,
hierarchical FedAvg, ``labels`` oracle), driven in-process on the cached features. From
the learned head it reconstructs every test item's uncertainty, SLM answer and LLM answer
and reports, per lever and mean over seeds: SLM-only accuracy, AUROC of the uncertainty as
a detector of SLM errors, accuracy when the 1/2/5/10% most uncertain items go to the LLM,
the oracle router's accuracy at the same rates (the gap), the learned operating point
(accuracy, LLM rate) and the run's wall time. Writes bench/results/frontier.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedhlm_app import evaluation as ev  # noqa: E402
from fedhlm_app.config import validate  # noqa: E402
from fedhlm_app.experiments import item_outcomes  # noqa: E402
from fedhlm_app.launch import merged_config, with_default_paths  # noqa: E402

RATES = (0.01, 0.02, 0.05, 0.10)
LEVERS = {
    "linear-entropy": {},  # the default
    "linear-margin": {"uncertainty": "margin"},
    "rounds30-entropy": {"head-rounds": 30},
    "rounds30-margin": {"head-rounds": 30, "uncertainty": "margin"},
    "mlp256-entropy": {"head-hidden": 256},
    "mlp256-margin": {"head-hidden": 256, "uncertainty": "margin"},
    "ngrams-entropy": {"ngram-buckets": 2**18},
    "ngrams-margin": {"ngram-buckets": 2**18, "uncertainty": "margin"},
    "ngrams-rounds30-margin": {"ngram-buckets": 2**18, "head-rounds": 30, "uncertainty": "margin"},
    "mpnet-margin": {"slm-model": "mpnet", "uncertainty": "margin"},
    "mpnet-ngrams-margin": {"slm-model": "mpnet", "ngram-buckets": 2**18, "uncertainty": "margin"},
    "mpnet-ngrams-rounds30-margin": {"slm-model": "mpnet", "ngram-buckets": 2**18, "head-rounds": 30, "uncertainty": "margin"},
}


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (rank formula)."""
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start:start + count]] = start + (count + 1) / 2.0
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / max(n_pos * n_neg, 1))


def measure(cfg: dict, out: Path) -> dict:
    from fedhlm_app.inprocess import run_inprocess

    started = time.monotonic()
    run_inprocess(cfg)
    wall = time.monotonic() - started
    run_dir = out / cfg["run-name"]
    results = json.loads((run_dir / "results.json").read_text())
    items = item_outcomes(cfg, run_dir)
    u, slm, llm = items["u"], items["slm"].astype(bool), items["llm"].astype(bool)
    row = {"slm_accuracy": float(slm.mean()), "auroc": auroc(u, ~slm), "accuracy": results["accuracy"],
           "llm_rate": results["llm_rate"], "wall_s": wall}
    for rate in RATES:
        k = int(round(rate * len(u)))
        escalate = np.zeros(len(u), bool)
        escalate[np.argsort(-u, kind="mergesort")[:k]] = True
        row[f"acc@{rate:.0%}"] = ev.accuracy_at(escalate, slm, llm)
        row[f"oracle@{rate:.0%}"] = ev.accuracy_at(ev.oracle_router(slm, llm, rate), slm, llm)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "frontier")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    base = with_default_paths(merged_config([str(ROOT / "conf" / "paper.toml")], []))
    table: dict[str, dict[str, dict[str, float]]] = {}
    for lever in args.levers:
        rows = []
        for seed in args.seeds:
            cfg = validate({**base, **LEVERS[lever], "seed": seed, "run-name": f"{lever}-seed{seed}",
                            "results-dir": str(args.out), "data-source": "local"})
            rows.append(measure(cfg, args.out))
            print(lever, seed, {k: round(v, 4) for k, v in rows[-1].items()}, flush=True)
        table[lever] = {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))} for k in rows[0]}
    # Levers measured earlier on the same seeds stay in the file; those measured now replace theirs.
    path = args.out.parent / "frontier.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    if earlier.get("seeds") == args.seeds:
        table = {**earlier["levers"], **table}
    path.write_text(json.dumps({"seeds": args.seeds, "levers": table}, indent=2) + "\n")
    keys = ["slm_accuracy", "auroc", *[f"acc@{r:.0%}" for r in RATES], *[f"oracle@{r:.0%}" for r in RATES], "accuracy", "llm_rate", "wall_s"]
    print("| lever | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for lever, stats in table.items():
        print(f"| {lever} | " + " | ".join(
            f"{stats[k]['mean']:.1f}" if k == "wall_s" else f"{100 * stats[k]['mean']:.2f} ± {100 * stats[k]['std']:.2f}" if k != "auroc"
            else f"{stats[k]['mean']:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()

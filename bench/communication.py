"""Training traffic before and after compression, side by side in one run of the benchmark.

    python bench/communication.py [--seeds 42 43 44] [--preset conf/paper.toml] [-c "key=value ..."]

Launches the main job twice through the real launcher (``flwr run`` on Ray, as ``make run``), on
the same data and seed: once with ``compression = "none"`` (every model message carries the whole
model in float32, as before compression existed) and once with the configured compression (the
default: deltas of the changed rows, int4, error feedback). Prints, from each run's ledger
(``results.json`` ``communication``), the bytes of every training phase and link, the totals, the
accuracy and LLM rate of FedHLM's policy, the LLM bytes at inference and the break-even point
against cloud-only. With several ``--seeds`` both runs are repeated per seed (the bytes table is the
first seed's) and the accuracy and LLM-rate differences are summarized as mean ± standard deviation.
Writes bench/results/communication.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from main_job import ROOT, launch

sys.path.insert(0, str(ROOT))
from fedhlm_app import paths  # noqa: E402


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=str(ROOT / "conf" / "paper.toml"))
    parser.add_argument("-c", "--run-config", action="append", default=[], help="overrides for both runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="one pair of runs per seed")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "communication.json"))
    args = parser.parse_args()
    results_dir = ROOT / "bench" / "results" / "runs"
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs_by_seed: dict[int, dict[str, dict]] = {}
    for seed in args.seeds:
        runs_by_seed[seed] = {}
        for label, extra in (("uncompressed", ["compression='none'"]), ("compressed", [])):
            print(f"bench/communication.py: seed {seed}, {label} ...", flush=True)
            name = f"{stamp}-communication-{label}-seed{seed}"
            launch(name, args.preset, [*args.run_config, f"seed={seed}", *extra], paths.cache_dir(""), results_dir)
            runs_by_seed[seed][label] = json.loads((results_dir / name / "results.json").read_text())

    first = runs_by_seed[args.seeds[0]]
    print(f"\nBytes per phase and link, seed {args.seeds[0]}:")
    before, after = (first[k]["communication"] for k in ("uncompressed", "compressed"))
    links = sorted({(phase, link) for c in (before, after) for phase, by_link in c["by_phase_and_link"].items()
                    if not phase.startswith("inference") for link in by_link})
    print("\n| phase | link | uncompressed | compressed | ratio |\n|---|---|---|---|---|")
    for phase, link in links:
        b, a = (c["by_phase_and_link"].get(phase, {}).get(link, {}).get("bytes", 0) for c in (before, after))
        print(f"| {phase} | {link} | {_mb(b)} | {_mb(a)} | {b / a if a else float('inf'):,.1f}x |")
    for phase in before["training_bytes_by_phase"]:
        b, a = before["training_bytes_by_phase"][phase], after["training_bytes_by_phase"][phase]
        if b or a:
            print(f"| **{phase}** | all | {_mb(b)} | {_mb(a)} | {b / a if a else float('inf'):,.1f}x |")
    b, a = before["training_bytes"], after["training_bytes"]
    print(f"| **training** | all | {_mb(b)} | {_mb(a)} | {b / a:,.1f}x |")

    print("\n| seed | run | accuracy | LLM rate | SLM-only accuracy | LLM bytes (inference) | training bytes | break-even queries |\n"
          "|---|---|---|---|---|---|---|---|")
    rows: dict[int, dict[str, dict]] = {}
    for seed, pair in runs_by_seed.items():
        rows[seed] = {}
        for label, r in pair.items():
            ours = r["communication"]["policies"]["fedhlm"]
            row = rows[seed][label] = {
                "accuracy": r["accuracy"], "llm_rate": r["llm_rate"], "slm_accuracy": r["baselines"]["slm_only"]["accuracy"],
                "inference_bytes": ours["inference_bytes"], "training_bytes": r["communication"]["training_bytes"],
                "break_even_queries": r["communication"]["break_even_queries"]}
            print(f"| {seed} | {label} | {100 * row['accuracy']:.2f}% | {100 * row['llm_rate']:.2f}% | {100 * row['slm_accuracy']:.2f}% | "
                  f"{row['inference_bytes'] / 1e3:,.1f} kB | {_mb(row['training_bytes'])} | {row['break_even_queries']:,} |")
    change = {k: [100 * (r["compressed"][k] - r["uncompressed"][k]) for r in rows.values()] for k in ("accuracy", "llm_rate", "slm_accuracy")}
    spread = lambda xs: f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else ""  # noqa: E731
    print("\ncompressed - uncompressed" + (f", mean ± SD over seeds {' '.join(map(str, args.seeds))}" if len(args.seeds) > 1 else "") + ": "
          + ", ".join(f"{name} {statistics.mean(change[k]):+.2f}{spread(change[k])} points"
                      for k, name in (("accuracy", "accuracy"), ("llm_rate", "LLM rate"), ("slm_accuracy", "SLM-only accuracy")))
          + f"; training bytes {before['training_bytes'] / after['training_bytes']:,.1f}x fewer")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"runs": {str(seed): r for seed, r in rows.items()}, "change_points": change, "bytes": {"uncompressed": before, "compressed": after}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

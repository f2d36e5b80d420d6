"""Per-round cost benchmark: a threshold round's wall time as the number of clients grows.

    python bench/rounds.py [--clients 20,200,1000] [--rounds 5] [--engines ray,inprocess,floor]
    python bench/rounds.py --clients 1000 --clusters 50 --rounds 30 --engines ray -c "min-partition-size=0"   # paper setting, 1,000 clients

Each point runs the paper's preset with a different ``num-clients`` on the same total data (the
25,569 training and 7,600 test rows split among more, smaller clients; ``--clusters``, 4 by default), on three engines:

- ``ray``: a real launch (``python -m fedhlm_app.tools.launch``: SuperLink, ``flwr run``, Ray actors), so
  the round includes Flower's simulation engine dispatching every message to a Ray actor;
- ``inprocess``: the same ServerApp and ClientApps driven in one process
  (``fedhlm_app.tools.inprocess``), so the round is FedHLM's own work: every client's handlers, the
  LLM's verification, aggregation and accounting;
- ``floor``: Flower's Ray engine carrying the same two exchanges per client and round with messages
  that do no work (``bench/flower_floor.py``): what the engine alone costs at that client count.

A threshold round is two message exchanges with every client (calibrate; then the LLM's feedback
and a local tau update) plus the LLM's verification and the edge-then-cloud aggregation. The table
shows the median round over ``--rounds`` rounds and its growth from the first point, beside the
growth of the client count, and for the Ray launches their wall time (setup, the head and threshold
phases, inference) and peak memory (PSS of the whole process tree). Features come from the project's feature cache (``fedhlm_app.paths.cache_dir``,
filled on first use), so featurization is not part of any round. Writes bench/results/rounds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from flower_floor import median_round as floor_round_median
from main_job import ROOT, launch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as `make run`: the bundled data, no Hub lookups
sys.path.insert(0, str(ROOT))
from fedhlm_app import paths  # noqa: E402
from fedhlm_app.tools.inprocess import results_path, run_inprocess  # noqa: E402
from fedhlm_app.tools.launch import merged_config, with_default_paths  # noqa: E402


def inprocess_round_median(run_name: str, preset: str, overrides: list[str], cache_dir: Path, results_dir: Path) -> float:
    """Median threshold-round seconds of one in-process run."""
    extra = f"run-name='{run_name}' overwrite=true cache-dir='{cache_dir}' results-dir='{results_dir}'"
    cfg = with_default_paths(merged_config([preset], [*overrides, extra]))
    run_inprocess(cfg)
    rounds = json.loads((results_path(cfg) / "results.json").read_text())["thresholds"]["rounds"]
    return statistics.median(r["seconds"] for r in rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="20,200,1000", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=5, help="threshold rounds per launch")
    parser.add_argument("--clusters", type=int, default=4, help="edge servers (num-clusters)")
    parser.add_argument("-c", "--run-config", action="append", default=[], help="extra overrides, as for the launcher")
    parser.add_argument("--preset", default=str(ROOT / "conf" / "paper.toml"))
    parser.add_argument("--cache-dir", default=str(paths.cache_dir("")), help="feature cache (default: the project's, fedhlm_app.paths)")
    parser.add_argument("--engines", default="ray,inprocess,floor", help="any of ray, inprocess, floor")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "rounds.json"))
    args = parser.parse_args()
    try:
        counts = [int(c) for c in args.clients.split(",")]
    except ValueError:
        raise SystemExit(f"bench/rounds.py: --clients must be integers separated by commas, got '{args.clients}'") from None
    engines = args.engines.split(",")
    if min(counts) < args.clusters or args.rounds < 1 or not set(engines) <= {"ray", "inprocess", "floor"}:
        raise SystemExit("bench/rounds.py: need at least one client per cluster, 1 round, engines ray/inprocess/floor")

    results_dir = ROOT / "bench" / "results" / "runs"
    results_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for n in counts:
        overrides = [f"num-clients={n} num-clusters={args.clusters} threshold-rounds={args.rounds}", *args.run_config]
        row: dict = {"clients": n}
        for engine in engines:
            print(f"bench/rounds.py: {n} clients, {engine} ...", flush=True)
            name = f"{stamp}-rounds-{engine}-{n}"
            if engine == "ray":
                row["ray_run"] = launch(name, args.preset, overrides, cache_dir, results_dir)
                row["ray_round_s"] = row["ray_run"]["threshold_round_median_s"]
            elif engine == "floor":
                row["floor_round_s"] = floor_round_median(n, args.rounds + 1)  # its first round starts the actors
            else:
                row["inprocess_round_s"] = inprocess_round_median(name, args.preset, overrides, cache_dir, results_dir)
        rows.append(row)

    base = rows[0]
    titles = {"ray": "Ray simulation", "inprocess": "in-process (FedHLM's own work)", "floor": "Ray engine, no-op messages"}
    print("| clients | client growth | " + " | ".join(f"{titles[e]}: median round (s) | growth" for e in engines) + " |")
    print("|---|---|" + "---|---|" * len(engines))
    for row in rows:
        row["client_growth"] = row["clients"] / base["clients"]
        cells = [f"{row['clients']}", f"{row['client_growth']:.1f}x"]
        for e in engines:
            row[f"{e}_growth"] = row[f"{e}_round_s"] / base[f"{e}_round_s"]
            cells += [f"{row[f'{e}_round_s']:.3f}", f"{row[f'{e}_growth']:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    if "ray" in engines:
        print("\n| clients | launch wall (s) | setup (s) | head phase (s) | threshold phase (s) | inference (s) | peak memory (GB) |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            r = row["ray_run"]
            print(f"| {row['clients']} | {r['wall_s']:.1f} | {r['setup_s']:.1f} | {r['head_s']:.1f} | {r['threshold_s']:.1f} | "
                  f"{r['inference_s']:.1f} | {r['peak_pss_gb']:.2f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "rounds_per_launch": args.rounds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end benchmark of the main job: cold and warm wall time, where the time goes, peak memory.

    python bench/main_job.py [--warm 2] [--preset conf/paper.toml] [-c "key=value ..."]

Runs the real launcher (``python -m fedhlm_app.tools.launch``: its own SuperLink, ``flwr run``, Ray, one
SuperNode per client) once cold, on an empty feature cache of its own, then ``--warm`` times on
that now-filled cache; the user's cache is never touched. For each run it prints and writes to
JSON (bench/results/main_job.json):

- wall time of the whole launch, and the ServerApp's phases from results.json: setup (clients
  load data and featurize; on a warm cache only reads), head rounds, threshold rounds (with the
  median round), inference (every routing policy) and what lies outside the ServerApp: before it
  (SuperLink start, app packaging, Ray start-up) and after it (report, Ray and SuperLink shutdown);
- peak memory of the whole process tree (launcher, SuperLink, Ray's processes and workers),
  summed proportional set size (PSS: shared pages are split between the processes that share
  them, so torch libraries mapped by every worker are not counted twenty times), sampled every
  0.5 s from /proc (Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children_by_parent() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name may hold spaces: the fields after its closing parenthesis are fixed.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def _descendants(root: int) -> list[int]:
    tree, out, todo = _children_by_parent(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def _pss_bytes(pid: int) -> int:
    """Proportional set size of one process (RSS where smaps_rollup is unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class MemorySampler(threading.Thread):
    """Samples the summed PSS of a process and all its descendants until stopped."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_bytes, self.peak_processes = 0, 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            pids = _descendants(self.pid)
            total = sum(_pss_bytes(p) for p in pids)
            if total > self.peak_bytes:
                self.peak_bytes, self.peak_processes = total, len(pids)
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def launch(run_name: str, preset: str, overrides: list[str], cache_dir: Path, results_dir: Path) -> dict:
    """One launch of the main job, timed and memory-sampled; its results.json timings merged in."""
    config = f"run-name='{run_name}' overwrite=true cache-dir='{cache_dir}' results-dir='{results_dir}'"
    cmd = [sys.executable, "-m", "fedhlm_app.tools.launch", preset, *sum((["-c", o] for o in overrides), []), "-c", config]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    log_path = results_dir / f"{run_name}.log"
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = MemorySampler(proc.pid)
        sampler.start()
        code = proc.wait()
        sampler.stop()
    wall = time.time() - started
    if code != 0:
        raise SystemExit(f"bench/main_job.py: {run_name} failed (exit {code}); see {log_path}")
    results = json.loads((results_dir / run_name / "results.json").read_text())
    app = results["timings_s"]
    rounds = [r["seconds"] for r in results["thresholds"]["rounds"]]
    before = results["started_epoch"] - started
    return {
        "run": run_name,
        "wall_s": wall,
        "before_app_s": before,  # SuperLink start, app packaging, Ray start-up
        **{f"{phase}_s": app[phase] for phase in ("setup", "head", "threshold", "inference")},
        "after_app_s": wall - before - app["total"],  # report, Ray and SuperLink shutdown
        "threshold_round_median_s": statistics.median(rounds) if rounds else None,
        "peak_pss_gb": sampler.peak_bytes / 1e9,
        "processes_at_peak": sampler.peak_processes,
        "accuracy": results["accuracy"],
        "llm_rate": results["llm_rate"],
    }


COLUMNS = [
    ("run", "run", "{}"), ("wall_s", "wall s", "{:.1f}"), ("before_app_s", "before app", "{:.1f}"),
    ("setup_s", "setup (featurize)", "{:.1f}"), ("head_s", "head", "{:.1f}"), ("threshold_s", "threshold", "{:.1f}"),
    ("threshold_round_median_s", "median round", "{:.2f}"), ("inference_s", "inference", "{:.1f}"),
    ("after_app_s", "after app", "{:.1f}"), ("peak_pss_gb", "peak GB", "{:.2f}"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm", type=int, default=2, help="warm runs after the cold one")
    parser.add_argument("--preset", default=str(ROOT / "conf" / "paper.toml"))
    parser.add_argument("-c", "--run-config", action="append", default=[], help="extra overrides, as for the launcher")
    parser.add_argument("--cache-dir", help="an empty folder to fill and keep (default: a temporary one, removed)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "main_job.json"))
    args = parser.parse_args()
    if not Path("/proc/self/smaps_rollup").exists():
        raise SystemExit("bench/main_job.py: needs Linux /proc to sample memory")

    results_dir = ROOT / "bench" / "results" / "runs"
    results_dir.mkdir(parents=True, exist_ok=True)
    if args.cache_dir and Path(args.cache_dir).exists() and any(Path(args.cache_dir).iterdir()):
        raise SystemExit(f"bench/main_job.py: --cache-dir {args.cache_dir} is not empty, so the first run would not be cold")
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="fedhlm-bench-cache-")).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    try:
        for i in range(1 + args.warm):
            name = f"{stamp}-{'cold' if i == 0 else f'warm{i}'}"
            print(f"bench/main_job.py: {name} ...", flush=True)
            rows.append(launch(name, args.preset, args.run_config, cache_dir, results_dir))
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)

    print("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join("-" if row[k] is None else fmt.format(row[k]) for k, _, fmt in COLUMNS) + " |")
    cold, warm = rows[0], rows[1:]
    summary = {"cold_wall_s": cold["wall_s"], "cold_target_s": 240.0}
    if warm:
        summary |= {"warm_wall_s_median": statistics.median(r["wall_s"] for r in warm), "warm_target_s": 60.0}
    summary["peak_pss_gb"] = max(r["peak_pss_gb"] for r in rows)
    print(json.dumps(summary))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"runs": rows, "summary": summary, "cpu_count": os.cpu_count()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

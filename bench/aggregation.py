"""Aggregation benchmark: Flower strategies called through FedHLM's tiers, with and without their forced collections.

    python bench/aggregation.py [--heap-objects 3000000] [--replies 5] [--calls 20]

Flower's Bulyan and QFedAvg decode every reply with ``ArrayRecord.to_numpy_ndarrays(keep_input=False)``,
which runs a full ``gc.collect()`` per reply; a collection walks every tracked object of the process.
A ServerApp's process holds many (the model, the dataset, in a simulation the clients' data too),
so ``fedhlm_app.fl.tiers`` skips those calls for the strategy's ``aggregate_train`` (the decoded
arrays are freed by reference counting all the same). This script builds a heap of
``--heap-objects`` small tracked objects, then times the same rounds both ways in one process
(threshold-sized arrays: the cost is the collections, not the arithmetic) and checks that they
aggregate to the same arrays. Writes bench/results/aggregation.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedhlm_app.fl import strategies, tiers  # noqa: E402
from fedhlm_app.tools.inprocess import ensure_task_identity  # noqa: E402

STRATEGIES = {"Bulyan": {"num_malicious_nodes": 0}, "QFedAvg": {"client_learning_rate": 0.01}, "FedAvg": {}}


def time_rounds(name: str, replies: list, calls: int, skipping: bool) -> tuple[float, list[np.ndarray]]:
    """Milliseconds per round (``configure_train`` then ``aggregate_train``, as the tiers call them), and the last result."""
    skip = tiers._without_forced_collections
    if not skipping:
        tiers._without_forced_collections = contextlib.nullcontext
    try:
        strategy = strategies.build(name, STRATEGIES[name], replies=len(replies))
        started = time.perf_counter()
        for rnd in range(1, calls + 1):
            tiers._configure(strategy, "bench", rnd, [np.zeros(1, np.float32)], list(range(len(replies))))  # the round's model
            result = tiers._reduce(strategy, "bench", rnd, replies)
        return (time.perf_counter() - started) / calls * 1000, result
    finally:
        tiers._without_forced_collections = skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heap-objects", type=int, default=3_000_000, help="small tracked objects standing for a ServerApp's heap")
    parser.add_argument("--replies", type=int, default=5, help="replies per aggregation (a cluster of the paper's setting)")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "aggregation.json"))
    args = parser.parse_args()
    ensure_task_identity()  # Flower's messages need a run, as in a ServerApp
    heap = [[i] for i in range(args.heap_objects)]
    rng = np.random.default_rng(0)
    replies = [([rng.normal(size=1).astype(np.float32)], {"num-examples": 10, "train_loss": 0.5}) for _ in range(args.replies)]
    rows = []
    for name in STRATEGIES:
        plain_ms, plain = time_rounds(name, replies, args.calls, skipping=False)
        skipped_ms, skipped = time_rounds(name, replies, args.calls, skipping=True)
        same = all(np.array_equal(a, b) for a, b in zip(plain, skipped))
        rows.append({"strategy": name, "collecting_ms": plain_ms, "skipping_ms": skipped_ms, "ratio": plain_ms / skipped_ms, "same_arrays": same})
    print(f"| strategy ({args.replies} replies, heap of {len(heap):,} objects) | ms per round, Flower's collections | "
          "ms, collections skipped | ratio | same arrays |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['collecting_ms']:.1f} | {r['skipping_ms']:.2f} | {r['ratio']:.0f}x | {r['same_arrays']} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"heap_objects": args.heap_objects, "replies": args.replies, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

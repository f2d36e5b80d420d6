"""The floor under a round: Flower's Ray simulation engine carrying messages that do no work.

    python bench/flower_floor.py [--clients 20,200] [--rounds 10]

A threshold round of FedHLM is two message exchanges with every client (``bench/rounds.py``). This
script runs the same shape of round with nothing in it: a ServerApp that, each round, sends every
node a message with one small array twice (as FedHLM's calibrate and threshold messages), and a
ClientApp that answers each with one small array. Same engine as ``flwr run`` (Flower's
``run_simulation``: the in-memory link state and Ray actors, one CPU per ClientApp), same message
loop as FedHLM (``fedhlm_app.app.exchange.send_and_receive``, the per-node dispatch index of
``fedhlm_app.fl.simulation_dispatch``). Prints the median round per client count and its growth
beside the client count's, so a growth target for FedHLM's rounds can be set against what the
engine alone costs per message. Writes bench/results/flower_floor.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from flwr.app import Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from fedhlm_app.app.exchange import send_and_receive, wait_for_nodes  # noqa: E402
from fedhlm_app.fl.records import arrays_record  # noqa: E402
from fedhlm_app.fl.simulation_dispatch import index_undelivered  # noqa: E402

client = ClientApp()


@client.query("calibrate")
@client.train("threshold")
def reply(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"arrays": arrays_record([np.zeros(1, np.float32)]), "metrics": MetricRecord({"num-examples": 1})}),
                   reply_to=msg)


def median_round(clients: int, rounds: int) -> float:
    """Median seconds of a two-exchange round of no-op messages with ``clients`` SuperNodes."""
    seconds: list[float] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        index_undelivered(grid)
        nodes = wait_for_nodes(grid, clients, timeout=600, stall=60)
        for _ in range(rounds):
            started = time.monotonic()
            for kind in ("query.calibrate", "train.threshold"):
                content = RecordDict({"arrays": arrays_record([np.zeros(1, np.float32)])})
                replies = send_and_receive(grid, [Message(content, node, kind) for node in nodes], timeout=600)
                if len(replies) != len(nodes):
                    raise RuntimeError(f"{len(replies)} of {len(nodes)} replies")
            seconds.append(time.monotonic() - started)

    run_simulation(server, client, num_supernodes=clients, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}})
    if len(seconds) != rounds:
        raise SystemExit(f"bench/flower_floor.py: the simulation with {clients} clients ran {len(seconds)} of {rounds} rounds")
    return statistics.median(seconds[1:] or seconds)  # the first round also starts the actors


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="20,200", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per simulation (the first is not counted)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "flower_floor.json"))
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    rows = [{"clients": n, "round_s": median_round(n, args.rounds)} for n in counts]
    print("| clients | client growth | no-op round, Ray engine (s) | growth |")
    print("|---|---|---|---|")
    for row in rows:
        row["growth"] = row["round_s"] / rows[0]["round_s"]
        print(f"| {row['clients']} | {row['clients'] / rows[0]['clients']:.1f}x | {row['round_s']:.3f} | {row['growth']:.2f}x |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "rounds": args.rounds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(cli())

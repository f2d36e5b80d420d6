"""Clients that leave mid-run: the run goes on with the rest and records who left."""

import json

import pytest
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from client_app import app as client_app
from fedhlm_app.paths import BUNDLED_DATA
from helpers import LocalGrid, default_run_config, server_context
from server_app import app as server_app

SUPERLINK_ID = 0  # the SuperLink writes "node unavailable" replies under its own id


class DyingGrid(LocalGrid):
    """A grid whose node ``victim`` dies after it answered ``answers`` messages.

    ``how``: "unavailable" (the SuperLink reports the node gone, as after missed
    heartbeats) or "silent" (no reply ever comes).
    """

    def __init__(self, *args, victim: int, answers: int, how: str) -> None:
        super().__init__(*args)
        self.victim, self.answers, self.how = victim, answers, how
        self.after_death: list[str] = []

    def push_messages(self, messages):
        alive, ids = [], []
        for m in messages:
            if m.metadata.dst_node_id == self.victim and self.answers <= 0:
                self.after_death.append(m.metadata.message_type)
                m.metadata.__dict__["_message_id"] = f"lost-{len(self.after_death)}"
                if self.how == "unavailable":
                    reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"), reply_to=m)
                    reply.metadata.__dict__["_src_node_id"] = SUPERLINK_ID
                    self._replies[m.metadata.message_id] = reply
                ids.append(m.metadata.message_id)
            else:
                if m.metadata.dst_node_id == self.victim:
                    self.answers -= 1
                alive.append(m)
        return ids + list(super().push_messages(alive))


def _run(tmp_path, tiny_bert, *, victim_index: int, answers: int, how: str, **overrides):
    nodes = [{"partition-id": i, "num-partitions": 5, "cluster-id": 0 if i < 3 else 1} for i in range(5)]
    rc = default_run_config(
        **{
            "slm-model": str(tiny_bert), "data-source": "local", "data-dir": str(BUNDLED_DATA), "num-clients": 5,
            "cache-dir": str(tmp_path / "cache"), "results-dir": str(tmp_path / "results"), "threshold-rounds": 3,
            **overrides,
        }
    )
    grid = DyingGrid(client_app, nodes, rc, victim=1000 + victim_index, answers=answers, how=how)
    server_app(grid, server_context(rc))
    return grid, json.loads((tmp_path / "results" / "latest" / "results.json").read_text())


@pytest.mark.parametrize("how", ["unavailable", "silent"])
def test_a_node_that_dies_mid_run_is_dropped_and_recorded(tmp_path, tiny_bert, how):
    # Node 1 (cluster 0) answers setup, both head rounds and the head's install, then dies in the first threshold round.
    grid, results = _run(tmp_path, tiny_bert, victim_index=1, answers=4, how=how, **{"round-timeout": 3.0})
    victim = 1001
    assert grid.after_death == ["query.calibrate"]  # one lost message, then it is never addressed again
    assert results["dropouts"] == [
        {"node_id": victim, "cluster": 0, "partition_id": 1, "phase": "threshold", "round": 1,
         "reason": "Error: Node Unavailable" if how == "unavailable" else "no reply within 3s"}
    ]
    assert {c["node_id"] for c in results["clients"]} == {1000, 1002, 1003, 1004}
    assert results["clusters"]["0"]["clients"] == 2 and results["clusters"]["1"]["clients"] == 1 + 1
    # both clusters kept aggregating in every threshold round after the loss
    assert all(set(r["tau_clusters"]) == {"0", "1"} for r in results["thresholds"]["rounds"])
    assert all(r["clients"] == 4 for r in results["thresholds"]["rounds"])
    summary = (tmp_path / "results" / "latest" / "summary.md").read_text()
    assert "1 of 5 clients dropped out" in summary


def test_the_run_stops_when_fewer_than_min_active_clients_remain(tmp_path, tiny_bert):
    with pytest.raises(RuntimeError, match="4 clients left, fewer than min-active-clients = 5"):
        _run(tmp_path, tiny_bert, victim_index=4, answers=1, how="unavailable", **{"min-active-clients": 5})


def test_clients_with_an_empty_partition_are_skipped_and_counted(tmp_path, tiny_bert):
    nodes = [{"partition-id": i, "num-partitions": 8, "cluster-id": i % 2} for i in range(8)]
    rc = default_run_config(**{
        "slm-model": str(tiny_bert), "data-source": "local", "data-dir": str(BUNDLED_DATA), "num-clients": 8,
        "max-train-items": 40, "max-test-items": 40, "dirichlet-alpha": 0.1, "min-partition-size": 0,
        "cache-dir": str(tmp_path / "cache"), "results-dir": str(tmp_path / "results"), "threshold-rounds": 1,
    })
    grid = LocalGrid(client_app, nodes, rc)
    server_app(grid, server_context(rc))
    results = json.loads((tmp_path / "results" / "latest" / "results.json").read_text())
    skipped = [d for d in results["dropouts"] if d["phase"] == "setup"]
    assert skipped and all(d["reason"].startswith("empty partition") for d in skipped)
    assert len(results["clients"]) + len(skipped) == 8
    assert f"{len(skipped)} of 8 clients dropped out" in (tmp_path / "results" / "latest" / "summary.md").read_text()
    assert results["rejected_updates"] == []  # the empty clients never sent a zero-weight update


class RaisingClientApp:
    """The real ClientApp, except that node ``node`` raises in threshold round ``rnd``."""

    def __init__(self, node: int, rnd: int) -> None:
        self.node, self.rnd, self.rounds = node, rnd, 0

    def __call__(self, msg, context):
        if context.node_id == self.node and msg.metadata.message_type == "train.threshold":
            self.rounds += 1
            if self.rounds == self.rnd:
                raise RuntimeError("out of memory")
        return client_app(msg, context)


def test_a_client_that_raises_costs_its_update_for_that_round_only(tmp_path, tiny_bert):
    nodes = [{"partition-id": i, "num-partitions": 5, "cluster-id": 0 if i < 3 else 1} for i in range(5)]
    rc = default_run_config(**{
        "slm-model": str(tiny_bert), "data-source": "local", "data-dir": str(BUNDLED_DATA), "num-clients": 5,
        "cache-dir": str(tmp_path / "cache"), "results-dir": str(tmp_path / "results"), "threshold-rounds": 3,
    })
    server_app(LocalGrid(RaisingClientApp(1002, 2), nodes, rc), server_context(rc))
    results = json.loads((tmp_path / "results" / "latest" / "results.json").read_text())
    assert [(f["phase"], f["round"], f["node"], f["dropped"]) for f in results["failures"]] == [("threshold", 2, 1002, False)]
    assert "out of memory" in results["failures"][0]["reason"]
    assert [r["clients"] for r in results["thresholds"]["rounds"]] == [5, 4, 5]
    assert results["dropouts"] == [] and len(results["clients"]) == 5

"""Run the real ServerApp and ClientApps in one process, without Ray or a SuperLink.

``LocalGrid`` implements Flower's ``Grid`` by calling the ClientApp directly,
one ``Context`` per node (so ``node_config`` may carry ``cluster-id``). The
evaluation harness and the fast tests use it: same app code, same messages,
none of the start-up cost of a simulation. ``flwr run`` remains the way to run
the app for real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid


def ensure_task_identity() -> None:
    """Building a ``Message`` outside a Flower runtime needs a task identity (internal API)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


class LocalGrid(Grid):
    """Drives a ClientApp in-process, one Context per node."""

    def __init__(self, client_app, node_configs: list[dict[str, Any]], run_config: dict[str, Any], first_node_id: int = 1000) -> None:
        self._app = client_app
        self._ctx = {
            first_node_id + i: Context(run_id=1, node_id=first_node_id + i, node_config=nc, state=RecordDict(), run_config=dict(run_config))
            for i, nc in enumerate(node_configs)
        }
        self._run = None
        self._replies: dict[str, Message] = {}  # message id -> the ClientApp's reply, until pulled
        self.sent: list[str] = []

    def set_run(self, run_id):  # Grid API
        self._run = run_id

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self._ctx)

    def push_messages(self, messages):
        """Run the ClientApp on each message at once; its reply waits for ``pull_messages``."""
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid4().hex  # what Flower's InMemoryGrid does
            self.sent.append(m.metadata.message_type)
            try:
                reply = self._app(m, self._ctx[m.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - as in Flower, a failing ClientApp becomes an error reply
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=m)
            self._replies[m.metadata.message_id] = reply
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def context(self, node_id: int) -> Context:
        return self._ctx[node_id]

    def state(self, node_id: int) -> RecordDict:
        return self._ctx[node_id].state


def server_context(run_config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))


def simulation_nodes(num_clients: int) -> list[dict[str, Any]]:
    """Node configs as Flower's simulation gives them (clusters derived from partition-id)."""
    return [{"partition-id": i, "num-partitions": num_clients} for i in range(num_clients)]


def run_inprocess(run_config: dict[str, Any], node_configs: list[dict[str, Any]] | None = None) -> LocalGrid:
    """Run FedHLM once; results land in ``results-dir/run-name`` as with ``flwr run``."""
    from client_app import app as client_app  # the top-level entry points, as Flower loads them
    from server_app import app as server_app

    ensure_task_identity()
    nodes = node_configs if node_configs is not None else simulation_nodes(int(run_config["num-clients"]))
    grid = LocalGrid(client_app, nodes, run_config)
    server_app(grid, server_context(run_config))
    return grid


def results_path(run_config: dict[str, Any]) -> Path:
    from fedhlm_app.paths import results_dir

    return results_dir(str(run_config["results-dir"])) / str(run_config["run-name"])

"""Sending one phase's messages and collecting the replies: timeouts, failures, dropouts, bytes.

Every message and reply is booked in the ledger at its serialized size, on the links
``protocol.instruction_bookings`` and ``protocol.reply_bookings`` name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedhlm_app.app.protocol import instruction_bookings, reply_bookings
from fedhlm_app.reporting.ledger import Ledger

# Reply polling: fast at first (a simulated round trip takes milliseconds), then backing off.
FIRST_POLL_S, MAX_POLL_S = 0.005, 0.25


@dataclass
class Exchange:
    """Sends one phase's messages to nodes, counts bytes, returns the good replies.

    A node that fails in a phase is logged in ``failures``. A node that is gone (the
    SuperLink reports it unavailable, or it does not answer within the timeout) is also
    recorded in ``dropped`` and gets no further messages, so a dead SuperNode costs one
    wait, not one per phase; a node whose ClientApp raised stays in the run.
    """

    grid: Grid
    ledger: Ledger
    timeout: float
    failures: list[dict[str, Any]] = field(default_factory=list)
    min_active: int = 1  # the run stops when fewer nodes remain
    dropped: dict[int, dict[str, Any]] = field(default_factory=dict)  # node -> where and why it left
    nodes: set[int] = field(default_factory=set)  # every node addressed so far

    def __call__(self, phase: str, message_type: str, contents: dict[int, RecordDict], rnd: int | None = None) -> dict[int, Message]:
        contents = {node: content for node, content in contents.items() if node not in self.dropped}
        self.nodes.update(contents)
        messages, bookings = [], {}
        for node, content in contents.items():
            if id(content) not in bookings:  # a content several nodes share (a cluster's broadcast) is measured once
                bookings[id(content)] = instruction_bookings(content)
            self._book(phase, bookings[id(content)])
            messages.append(Message(content, dst_node_id=node, message_type=message_type))
        received = send_and_receive(self.grid, messages, self.timeout)
        # Errors the SuperLink writes itself (node unavailable) come from the SuperLink's id.
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        replies: dict[int, Message] = {}
        failed: set[int] = set()
        for reply in received:
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                self._fail(phase, rnd, node, str(reply.error.reason), gone=reply.error.code == ErrorCode.NODE_UNAVAILABLE)
                failed.add(node)
                continue
            self._book(phase, reply_bookings(reply.content))
            replies[node] = reply
        for node in set(contents) - set(replies) - failed:
            self._fail(phase, rnd, node, f"no reply within {self.timeout:.0f}s", gone=True)
        active = len(self.nodes) - len(self.dropped)
        if self.dropped and active < self.min_active:
            raise RuntimeError(
                f"{phase}: {active} clients left, fewer than min-active-clients = {self.min_active} "
                f"(dropped out: {sorted(self.dropped)})"
            )
        return replies

    def _book(self, phase: str, bookings) -> None:
        for b in bookings:
            self.ledger.add(b.phase or phase, b.link, b.nbytes, items=b.items)

    def drop(self, phase: str, node: int, reason: str) -> None:
        """Take ``node`` out of the run (recorded like a dropout)."""
        self._fail(phase, None, node, reason, gone=True)

    def _fail(self, phase: str, rnd: int | None, node: int, reason: str, gone: bool) -> None:
        where = phase if rnd is None else f"{phase} round {rnd}"
        log(WARNING, "%s: node %s %s: %s", where, node, "dropped out" if gone else "failed", reason)
        self.failures.append({"phase": phase, "round": rnd, "node": node, "reason": reason, "dropped": gone})
        if gone:
            self.dropped[node] = {"phase": phase, "round": rnd, "reason": reason}


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Push ``messages`` and collect their replies until all are in or ``timeout`` passes.

    ``Grid.send_and_receive`` polls every 0.1 s in simulation and every 3 s in deployment,
    a floor under every exchange; FedHLM exchanges tiny messages many times per round, so
    this polls from 5 ms up, doubling the wait while nothing arrives.
    """
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    wait = FIRST_POLL_S
    while pending and time.monotonic() < deadline:
        pulled = list(grid.pull_messages(pending))
        replies.extend(pulled)
        pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
        wait = FIRST_POLL_S if pulled else min(2 * wait, MAX_POLL_S)
        if pending:
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
    return replies


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, stall: float) -> list[int]:
    """Node ids once ``wanted`` nodes are connected. Gives up when no new node has connected for
    ``stall`` seconds (a simulation registers all its SuperNodes at once) or after ``timeout``,
    raising an error that names the fix."""
    started = last_change = time.monotonic()
    nodes: list[int] = []
    while True:
        now_nodes = sorted(grid.get_node_ids())
        now = time.monotonic()
        if len(now_nodes) != len(nodes):
            nodes, last_change = now_nodes, now
        if len(nodes) >= wanted:
            return nodes
        if now - last_change > stall or now - started > timeout:
            raise RuntimeError(
                f"only {len(nodes)} of the {wanted} SuperNodes this run needs connected (no new one in {now - last_change:.0f} s). "
                f'In a simulation pass --federation-config "num-supernodes={wanted}" to flwr run (or lower num-clients); '
                "in a deployment start more SuperNodes, set min-clients to run with fewer, or raise node-wait"
            )
        time.sleep(0.5)

"""Flower's simulation engine, made to hand out a round's messages in time linear in the clients.

In a ``flwr run`` simulation (Flower 1.42) a thread of the simulation runtime feeds the Ray actors:
every 0.1 s it calls ``InMemoryLinkState.get_message_ins(node_id, limit=1)`` for every node, and
each call walks every stored message and re-validates it (expiry, federation) under the state's
lock. One pass costs nodes x stored messages validations, and holds the lock that the ServerApp's
pushes and pulls and the actors' replies wait on: about nodes^2 x 4 us, 0.2 s a pass at 200
clients and 4 s at 1,000, several passes per exchange (``bench/rounds.py``).

``index_undelivered`` gives the simulation's link state a ``get_message_ins`` that keeps an index of
undelivered messages per node (rebuilt when the store changes) and validates only the asking
node's candidates: the same messages come out, in the same order, after the same checks; an
expired message (after the messages' time-to-live, hours) is dropped when its own node is polled
rather than when any node is. It changes one object, the
in-memory state of the process the ServerApp runs in (the simulation's, reached through its
``InMemoryGrid``); a deployment's SuperLink is another process and is left as it is.
"""

from __future__ import annotations

import types
from collections import defaultdict
from typing import Any

from flwr.app import Message
from flwr.supercore.date import now

_INDEX = "_fedhlm_undelivered_index"


def _get_message_ins(self: Any, node_id: int, limit: int | None, *, run_id: int | None = None) -> list[Message]:
    """``InMemoryLinkState.get_message_ins``, reading the node's candidates from the index."""
    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    found: list[Message] = []
    with self.lock:
        store = self.message_ins_store
        mark = (len(store), next(reversed(store), None))  # ids are unique: any insertion or deletion changes it
        cached = self.__dict__.get(_INDEX)
        if cached is None or cached[0] != mark:
            index: dict[int, list[str]] = defaultdict(list)
            for msg_id, msg in store.items():
                if msg.metadata.delivered_at == "":
                    index[msg.metadata.dst_node_id].append(msg_id)
            cached = (mark, index)
            self.__dict__[_INDEX] = cached
        for msg_id in cached[1].get(node_id, ()):
            self._check_stored_messages({msg_id})
            msg = store.get(msg_id)
            if msg and msg.metadata.dst_node_id == node_id and (run_id is None or msg.metadata.run_id == run_id) \
                    and msg.metadata.delivered_at == "":
                found.append(msg)
            if limit and len(found) == limit:
                break
    delivered_at = now().isoformat()
    for msg in found:
        msg.metadata.delivered_at = delivered_at
    return found


def index_undelivered(grid: Any) -> bool:
    """Give a simulation's in-memory link state the indexed ``get_message_ins``; False (nothing changed)
    for any other grid (a deployment's gRPC grid, the in-process test grid)."""
    state = getattr(grid, "state", None)
    if type(state).__name__ != "InMemoryLinkState" or not hasattr(state, "message_ins_store"):
        return False
    state.get_message_ins = types.MethodType(_get_message_ins, state)
    return True

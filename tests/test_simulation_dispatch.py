"""The simulation's indexed message dispatch hands out what Flower's own ``get_message_ins`` does."""

import threading
import types

import numpy as np
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

from fedhlm_app.fl.simulation_dispatch import _get_message_ins, index_undelivered


class _Meta:
    def __init__(self, dst, run_id):
        self.dst_node_id, self.run_id, self.delivered_at = dst, run_id, ""


class _Msg:
    def __init__(self, dst, run_id):
        self.metadata = _Meta(dst, run_id)


class _Store:
    """The parts of ``InMemoryLinkState`` that ``get_message_ins`` reads; expired ids are dropped on check."""

    def __init__(self, messages, expired):
        self.lock = threading.RLock()
        self.message_ins_store = dict(messages)
        self.expired = set(expired)
        self.checked = []

    def _check_stored_messages(self, ids, run_id=None):
        for i in ids:
            self.checked.append(i)
            if i in self.expired:
                self.message_ins_store.pop(i, None)


def _store(seed):
    rng = np.random.default_rng(seed)
    messages = [(f"m{i}", _Msg(int(rng.integers(5)), int(rng.integers(2)))) for i in range(60)]
    expired = [f"m{i}" for i in rng.choice(60, 6, replace=False)]
    return messages, expired


def _pending(store, expired):
    return sorted(k for k, m in store.message_ins_store.items() if m.metadata.delivered_at == "" and k not in expired)


def test_indexed_dispatch_gives_the_same_messages_in_the_same_order_as_flowers():
    for seed in range(5):
        messages, expired = _store(seed)
        original, indexed = _Store(messages, expired), _Store(_store(seed)[0], expired)
        rng = np.random.default_rng(seed + 100)
        for step in range(40):
            node, limit = int(rng.integers(6)), [1, 2, None][step % 3]
            run_id = None if step % 4 else int(rng.integers(2))
            want = InMemoryLinkState.get_message_ins(original, node, limit, run_id=run_id)
            got = _get_message_ins(indexed, node, limit, run_id=run_id)
            assert [m.metadata.dst_node_id for m in got] == [m.metadata.dst_node_id for m in want]
            assert [k for k, m in indexed.message_ins_store.items() if m in got] == \
                   [k for k, m in original.message_ins_store.items() if m in want]
            if step == 20:  # the ServerApp pushes more while the engine polls
                for store in (original, indexed):
                    store.message_ins_store[f"late{seed}"] = _Msg(node, 0)
        # what is still to hand out is the same (an expired message may be dropped later: when its own node asks)
        assert _pending(indexed, expired) == _pending(original, expired)
        assert len(indexed.checked) < len(original.checked)  # the point: fewer validations


def test_only_a_simulations_in_memory_state_is_changed():
    assert not index_undelivered(types.SimpleNamespace())  # a deployment's grid has no in-memory state
    assert not index_undelivered(types.SimpleNamespace(state=object()))

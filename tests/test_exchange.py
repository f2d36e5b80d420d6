"""The ServerApp's own reply polling (pure logic: a scripted grid and a recorded sleep)."""

from types import SimpleNamespace

import pytest

from fedhlm_app.app import server_app as server
from fedhlm_app.app.exchange import FIRST_POLL_S, MAX_POLL_S, send_and_receive


class ScriptedGrid:
    """Reply ``i`` becomes available at the pull numbered ``ready_at[i]`` (1-based)."""

    def __init__(self, ready_at: dict[str, int]) -> None:
        self.ready_at, self.pulls = ready_at, 0

    def push_messages(self, messages):
        return list(self.ready_at)

    def pull_messages(self, message_ids):
        self.pulls += 1
        ready = [i for i in message_ids if self.ready_at[i] <= self.pulls]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]


@pytest.fixture
def sleeps(monkeypatch):
    recorded: list[float] = []
    monkeypatch.setattr(server.time, "sleep", recorded.append)
    return recorded


def test_polls_fast_then_backs_off_and_collects_every_reply(sleeps):
    grid = ScriptedGrid({"a": 1, "b": 2, "c": 9})
    replies = send_and_receive(grid, [], timeout=60.0)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"]
    assert grid.pulls == 9
    # Each arrival resets the wait to the first interval; silence doubles it up to the cap.
    assert sleeps[:3] == [FIRST_POLL_S, FIRST_POLL_S, 2 * FIRST_POLL_S]
    assert all(b == min(2 * a, MAX_POLL_S) for a, b in zip(sleeps[2:], sleeps[3:]))
    # Flower's own loop sleeps 0.1 s (simulation) or 3 s (deployment) after every empty pull.
    assert sum(sleeps) < 0.1 * (grid.pulls - 1)


def test_timeout_returns_what_arrived(monkeypatch, sleeps):
    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(server.time, "monotonic", lambda: next(clock))
    grid = ScriptedGrid({"a": 1, "never": 10**9})
    replies = send_and_receive(grid, [], timeout=5.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert grid.pulls < 10

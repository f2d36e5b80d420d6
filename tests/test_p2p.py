import numpy as np
import pytest

from fedhlm_app.reporting.ledger import Ledger
from fedhlm_app.routing.p2p import (
    ClassSums,
    PeerCoordinator,
    neighbours,
    peer_accepts,
    resolve,
    wilson_interval,
    worth_trying,
)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_prototype_from_client_sums_equals_prototype_of_pooled_embeddings():
    rng = np.random.default_rng(0)
    clients = [(_unit(rng.normal(size=(n, 8))), rng.integers(0, 3, size=n)) for n in (20, 35, 7)]
    summed = ClassSums.of(*clients[0], 3) + ClassSums.of(*clients[1], 3) + ClassSums.of(*clients[2], 3)
    pooled_x = np.concatenate([x for x, _ in clients])
    pooled_y = np.concatenate([y for _, y in clients])
    expected = np.stack([pooled_x[pooled_y == k].mean(axis=0) for k in range(3)])
    assert np.allclose(summed.prototypes(), expected)


def test_far_away_item_is_never_accepted():
    protos = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    far = _unit(np.array([[0, 0, 1.0], [-1.0, 0, 0.01]]))
    for delta in (0.1, 0.5, 0.9):
        assert not peer_accepts(far, np.array([0, 0]), protos, delta, 0.0).any()
    near = _unit(np.array([[1.0, 0.1, 0]]))
    assert peer_accepts(near, np.array([0]), protos, 0.9, 0.5).all()
    assert not peer_accepts(near, np.array([1]), protos, 0.0, 0.0).any()  # closer to another class


def test_margin_requires_a_clear_winner_and_empty_prototypes_never_match():
    protos = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 0.0]])
    item = _unit(np.array([[1.0, 0.05]]))
    assert peer_accepts(item, np.array([0]), protos, 0.5, 0.0).all()
    assert not peer_accepts(item, np.array([0]), protos, 0.5, 0.05).any()
    assert not peer_accepts(item, np.array([2]), protos, -1.0, 0.0).any()


def test_resolve_tries_own_cluster_then_neighbours():
    own = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    neighbour = np.array([[0, 0, 1.0], [0, 1.0, 0]])
    x = _unit(np.array([[1.0, 0, 0], [0, 0.05, 1.0], [0.5, 0.5, 0.5]]))
    tiers = resolve(x, np.array([0, 0, 1]), own, [neighbour], delta=0.9, margin=0.1)
    assert tiers.tolist() == [1, 2, 3]


def test_opportunistic_rule_switches_p2p_off_below_the_cost_ratio():
    assert worth_trying(0.30, 0.05, 1.0) and not worth_trying(0.04, 0.05, 1.0)
    peers = PeerCoordinator("none", 1, cost_p2p=0.3, cost_llm=1.0)
    peers.record(0, attempts=100, hits=10, false_hits=2)   # h ~ 0.11 < 0.3
    peers.record(1, attempts=100, hits=60, false_hits=5)   # h ~ 0.60 > 0.3
    assert not peers.enabled(0) and peers.enabled(1)
    peers.refresh({})  # a new round: statistics describe the latest prototypes only
    assert peers.enabled(0) == worth_trying(0.5, 0.3, 1.0)


def test_nearest_neighbour_scope_picks_the_most_similar_cluster():
    base = np.eye(3)
    protos = {0: base, 1: base + 0.05, 2: np.roll(base, 1, axis=1)}
    assert neighbours(0, protos, "nearest", 1) == [1]
    assert neighbours(0, protos, "all", 1) == [1, 2]
    assert neighbours(0, protos, "none", 1) == []


def test_wilson_interval():
    lo, hi = wilson_interval(10, 100)
    assert lo == pytest.approx(0.0552, abs=1e-3) and hi == pytest.approx(0.1744, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 50)
    assert lo == 0.0 and 0 < hi < 0.1


def test_ledger_books_p2p_separately():
    ledger = Ledger()
    ledger.add("p2p", "client->edge", 300)
    ledger.add("threshold", "client->edge", 40)
    assert ledger.total("p2p") == 300 and ledger.total("threshold") == 40


def test_coordinator_view_follows_every_refresh():
    coord = PeerCoordinator("all", 1, cost_p2p=0.05, cost_llm=1.0)
    assert coord.view(0) is None  # no sums yet
    coord.refresh({10: (0, ClassSums.of(np.eye(2), np.array([0, 1]), 2)), 11: (1, ClassSums.of(np.eye(2), np.array([1, 0]), 2))})
    own, others = coord.view(0).own, coord.view(0).neighbours
    assert np.allclose(own, np.eye(2)) and np.allclose(others[0], np.eye(2)[::-1])
    coord.refresh({10: (0, ClassSums.of(np.eye(2), np.array([1, 0]), 2))})  # node 10 changed its sums
    assert np.allclose(coord.view(0).own, np.eye(2)[::-1])

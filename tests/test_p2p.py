import numpy as np
import pytest

from fedhlm_app.reporting.ledger import Ledger
from fedhlm_app.routing.p2p import ClassSums, PeerCoordinator, Prototypes, margin_scores, neighbours, resolve
from fedhlm_app.routing.peer_bound import (
    NEVER,
    NUM_BINS,
    RANK_BINS,
    SCORE_EDGES,
    PeerCosts,
    PeerEvidence,
    beats_raising_threshold,
    error_bound,
    wilson_interval,
    worth_trying,
)

COSTS = PeerCosts(p2p=0.05, llm=1.0, error=1.0)


def _evidence(scores, drafts, wrong, num_classes, uncertainty=None):
    """Held-out evidence; where the test does not care, items are ranked in their given order."""
    scores = np.asarray(scores, dtype=float)
    return PeerEvidence.of(scores, np.asarray(drafts), np.asarray(wrong), np.arange(len(scores)) if uncertainty is None else uncertainty,
                           num_classes)


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


def test_margin_score_is_the_lead_of_the_draft_class_and_empty_prototypes_never_confirm():
    protos = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    item = _unit(np.array([[1.0, 0.5]]))
    cos = item @ protos[:2].T
    assert margin_scores(item, np.array([0]), protos)[0] == pytest.approx(cos[0, 0] - cos[0, 1])
    assert margin_scores(item, np.array([1]), protos)[0] < 0  # closer to another class
    assert margin_scores(item, np.array([2]), protos)[0] == -np.inf


def test_resolve_tries_own_cluster_then_neighbours_under_the_certified_thresholds():
    own = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    neighbour = np.array([[0, 0, 1.0], [0, 1.0, 0]])
    x = _unit(np.array([[1.0, 0, 0], [0.05, 0, 1.0], [0.5, 0.5, 0.5]]))
    prototypes = Prototypes(own, [neighbour])
    assert resolve(x, np.array([0, 0, 1]), prototypes, np.array([0.5, 0.5])).tolist() == [1, 2, 3]
    assert resolve(x, np.array([0, 0, 1]), prototypes, np.array([NEVER, 0.5])).tolist() == [3, 3, 3]


def _synthetic_cluster(rng, n, error_of_score):
    """Held-out items of one draft class with uniform scores and a known error probability per score."""
    scores = rng.uniform(-0.1, 0.45, size=n)
    return scores, rng.random(n) < error_of_score(scores)


def _true_error(threshold, error_of_score):
    """Exact error of the items a threshold accepts, for uniform scores on [-0.1, 0.45]."""
    grid = np.linspace(threshold, 0.45, 20001)
    return float(np.mean(error_of_score(grid)))


@pytest.mark.parametrize("epsilon", [0.02, 0.05, 0.1])
def test_certified_thresholds_keep_the_true_error_below_epsilon(epsilon):
    """Synthetic clusters whose true error per score is known: the true error of what the bound
    certifies exceeds epsilon in at most about 5% of clusters (95% confidence), and a region whose
    error is far below epsilon is found."""
    error_of_score = lambda s: np.clip(0.5 - 2.5 * s, 0.0, 1.0) * 0.6  # noqa: E731 - 0.3 at s = 0, 0 from s = 0.2
    rng = np.random.default_rng(7)
    violations, certified = 0, 0
    trials = 300
    for _ in range(trials):
        scores, wrong = _synthetic_cluster(rng, 1000, error_of_score)
        threshold = _evidence(scores, np.zeros(len(scores), np.int64), wrong, 1).certify(epsilon)[0]
        if threshold != NEVER:
            certified += 1
            violations += _true_error(threshold, error_of_score) > epsilon
    assert certified == trials  # with 1,000 held-out items a safe region always exists here
    assert violations / trials <= 0.08  # 5% nominal, with room for the binomial noise of 300 trials


def test_a_class_without_enough_held_out_items_never_takes_peer_answers():
    scores, wrong = np.full(20, 0.3), np.zeros(20, bool)  # perfect, but 20 items cannot show error <= 0.05
    assert error_bound(0, 20) > 0.05
    assert _evidence(scores, np.zeros(20, np.int64), wrong, 1).certify(0.05)[0] == NEVER


def test_testing_stops_at_the_first_failing_threshold():
    # 200 clean items at s = 0.3, then 200 items at s = 0.1 that are half wrong, then 2000 clean ones at 0.0:
    # the lowest threshold alone would pass (about 4% error), but testing stops where the error first fails.
    scores = np.concatenate([np.full(200, 0.3), np.full(200, 0.1), np.full(2000, 0.0)])
    wrong = np.concatenate([np.zeros(200, bool), np.arange(200) % 2 == 0, np.zeros(2000, bool)])
    evidence = _evidence(scores, np.zeros(len(scores), np.int64), wrong, 1)
    thresholds = evidence.certify(0.05)
    assert 0.1 < thresholds[0] <= 0.3  # the lowest edge that still leaves out the s = 0.1 items
    assert evidence.accepted(thresholds) == (2400, 200, 0)


def test_evidence_adds_up_and_counts_what_thresholds_accept():
    a = _evidence(np.array([0.05, 0.25, -0.2]), np.array([0, 1, 1]), np.array([True, False, False]), 2)
    b = _evidence(np.array([0.3]), np.array([1]), np.array([True]), 2)
    total = a + b
    assert total.items.shape == (2, NUM_BINS) and total.items.sum() == 4 and total.wrong.sum() == 2
    assert total.accepted(np.array([0.0, 0.2])) == (4, 3, 2)
    assert total.accepted(np.array([NEVER, 0.26])) == (4, 1, 1)
    assert SCORE_EDGES[0] == 0.0  # negative scores (the draft is not the nearest class) fall below every threshold


def test_opportunistic_rule_prices_false_reuse():
    scores = np.full(1000, 0.3)
    drafts = np.zeros(1000, np.int64)
    few_wrong = _evidence(scores, drafts, np.arange(1000) % 100 == 0, 1)  # 1% wrong
    assert worth_trying(few_wrong, np.array([0.0]), COSTS)
    many_wrong = _evidence(scores, drafts, np.arange(1000) % 2 == 0, 1)  # half of the answers wrong
    assert worth_trying(many_wrong, np.array([0.0]), PeerCosts(0.05, 1.0, 0.0))  # free errors: half the LLM calls saved
    assert not worth_trying(many_wrong, np.array([0.0]), COSTS)  # priced: 0.05 + 0.5 + 0.5 > 1
    assert not worth_trying(few_wrong, np.array([NEVER]), COSTS)  # nothing certified: peers are not tried
    assert not worth_trying(few_wrong, np.array([0.0]), PeerCosts(0.05, 1.0, 100.0))  # errors priced out


def test_coordinator_certifies_per_cluster_and_tries_peers_only_where_they_pay():
    coord = PeerCoordinator("none", 1, max_error=0.05, costs=COSTS, beat_threshold=False)
    clean = _evidence(np.full(500, 0.3), np.zeros(500, np.int64), np.zeros(500, bool), 2)
    noisy = _evidence(np.full(500, 0.3), np.zeros(500, np.int64), np.arange(500) % 3 == 0, 2)
    coord.certify({10: (0, clean), 11: (0, clean), 12: (1, noisy)})
    assert coord.evidence[0].items.sum() == 1000
    assert coord.evidence[0].accepted(coord.thresholds[0]) == (1000, 1000, 0) and coord.thresholds[0][1] == NEVER
    assert coord.thresholds[1][0] == NEVER
    assert coord.enabled(0) and not coord.enabled(1) and not coord.enabled(2)


def test_wrong_if_threshold_raised_counts_the_least_uncertain_items():
    # 40 items, the 10 least uncertain wrong; 2 items per rank bin
    uncertainty = np.random.default_rng(1).permutation(40).astype(float)
    evidence = _evidence(np.zeros(40), np.zeros(40, np.int64), uncertainty < 10, 1, uncertainty)
    assert evidence.rank_items.tolist() == [2] * RANK_BINS and evidence.rank_wrong.sum() == 10
    assert evidence.wrong_if_threshold_raised(0) == 0
    assert evidence.wrong_if_threshold_raised(3) == pytest.approx(3)  # one bin and half the next
    assert evidence.wrong_if_threshold_raised(10) == 10
    assert evidence.wrong_if_threshold_raised(40) == 10
    # pooled over clients, each client's items are ranked among its own
    pooled = evidence + _evidence(np.zeros(20), np.zeros(20, np.int64), np.ones(20, bool), 1, np.arange(20.0))
    assert pooled.rank_items.tolist() == [3] * RANK_BINS and pooled.rank_wrong.tolist() == [3] * 5 + [1] * 15


def _escalated(rng, n, slm_error_of_uncertainty, peer_error):
    """Held-out escalated items of one class: uncertainty uniform on [0, 1], the SLM's draft wrong
    with a known probability per uncertainty; peers take the half with a high score, wrong with
    ``peer_error`` regardless of the uncertainty."""
    uncertainty = rng.random(n)
    high = rng.random(n) < 0.5
    wrong = np.where(high, rng.random(n) < peer_error, rng.random(n) < slm_error_of_uncertainty(uncertainty))
    return _evidence(np.where(high, 0.35, -0.05), np.zeros(n, np.int64), wrong, 1, uncertainty)


def test_peers_are_tried_only_where_they_beat_raising_the_threshold():
    """Peers wrong 2% of the time: worse than raising a threshold near 0, where the least uncertain
    escalated drafts are wrong 0.5% of the time; better than raising one where they are wrong 30%."""
    rng = np.random.default_rng(3)
    easy = lambda u: np.where(u < 0.5, 0.005, 0.1)  # noqa: E731 - a threshold near 0: easy items escalated too
    hard = lambda u: np.full(len(u), 0.3)  # noqa: E731 - a high threshold: only hard items escalated
    for slm_error, expected in ((easy, False), (hard, True)):
        coord = PeerCoordinator("none", 1, max_error=0.05, costs=COSTS)
        coord.certify({10: (0, _escalated(rng, 3000, slm_error, 0.02)), 11: (0, _escalated(rng, 1000, slm_error, 0.02))})
        evidence, thresholds = coord.evidence[0], coord.thresholds[0]
        _, accepted, wrong = evidence.accepted(thresholds)
        assert accepted == pytest.approx(2000, rel=0.1) and wrong / accepted < 0.05
        assert worth_trying(evidence, thresholds, COSTS)  # the cost rule alone would try peers in both cases
        assert beats_raising_threshold(evidence, thresholds) is expected and coord.enabled(0) is expected


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
    assert error_bound(0, 0) == 1.0 and error_bound(5, 100) < wilson_interval(5, 100)[1]  # one-sided is tighter


def test_ledger_books_p2p_separately():
    ledger = Ledger()
    ledger.add("p2p", "client->edge", 300)
    ledger.add("threshold", "client->edge", 40)
    assert ledger.total("p2p") == 300 and ledger.total("threshold") == 40


def test_coordinator_view_follows_every_refresh():
    coord = PeerCoordinator("all", 1, max_error=0.05, costs=COSTS)
    assert coord.view(0) is None  # no sums yet
    coord.refresh({10: (0, ClassSums.of(np.eye(2), np.array([0, 1]), 2)), 11: (1, ClassSums.of(np.eye(2), np.array([1, 0]), 2))})
    own, others = coord.view(0).own, coord.view(0).neighbours
    assert np.allclose(own, np.eye(2)) and np.allclose(others[0], np.eye(2)[::-1])
    coord.refresh({10: (0, ClassSums.of(np.eye(2), np.array([1, 0]), 2))})  # node 10 changed its sums
    assert np.allclose(coord.view(0).own, np.eye(2)[::-1])


def test_evidence_travels_as_counts_and_inconsistent_counts_are_refused():
    from fedhlm_app.app.protocol import pack_evidence, unpack_evidence

    evidence = _evidence(np.array([0.05, 0.25, -0.2, 0.3]), np.array([0, 1, 1, 0]), np.array([True, False, False, True]), 2)
    back = unpack_evidence(pack_evidence(evidence))
    for name in ("items", "wrong", "rank_items", "rank_wrong"):
        np.testing.assert_array_equal(getattr(back, name), getattr(evidence, name))
    lying = PeerEvidence(evidence.items, evidence.wrong, evidence.rank_items, np.zeros(RANK_BINS, np.int64))  # hides its errors by rank
    with pytest.raises(ValueError, match="same items"):
        unpack_evidence(pack_evidence(lying))

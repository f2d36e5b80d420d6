import numpy as np
import pytest

from fedhlm_app.reporting.evaluation import (
    accuracy_at,
    normalized_auc,
    oracle_router,
    random_router_accuracy,
    rate_to_recover,
    threshold_curve,
    uhlm_threshold,
)


def test_auc_of_hand_computed_curves():
    # the random router is the straight line from (0, slm) to (1, cloud): AUC 0.5
    assert normalized_auc(np.array([[0.5, 0.75]]), 0.5, 1.0) == pytest.approx(0.5)
    # recover the whole gap at rate 0.2: area = 0.5 + (0.2 * 0.25) + 0.8 * 0.5 ... over the gap
    # frontier (0, .5) -> (.2, 1) -> (1, 1): area = .2*.75 + .8*1 = .95; (.95 - .5) / .5 = .9
    assert normalized_auc(np.array([[0.2, 1.0]]), 0.5, 1.0) == pytest.approx(0.9)
    # a point below the frontier does not lower it
    assert normalized_auc(np.array([[0.2, 1.0], [0.5, 0.6]]), 0.5, 1.0) == pytest.approx(0.9)


def test_gap_recovery_interpolates_between_points():
    curve = np.array([[0.1, 0.7], [0.3, 0.9]])
    # gap 0.5 -> 1.0; 50% = 0.75 lies between (0.1, 0.7) and (0.3, 0.9): rate 0.15
    assert rate_to_recover(curve, 0.5, 1.0, 0.5) == pytest.approx(0.15)
    # 80% = 0.9 is reached exactly at 0.3
    assert rate_to_recover(curve, 0.5, 1.0, 0.8) == pytest.approx(0.3)
    # from the SLM point (0, 0.5) to (0.1, 0.7): 20% of the gap = 0.6 at 0.05
    assert rate_to_recover(curve, 0.5, 1.0, 0.2) == pytest.approx(0.05)


def test_oracle_router_selects_slm_mistakes_the_llm_fixes_first():
    slm = np.array([1, 0, 0, 1, 0, 1], dtype=bool)
    llm = np.array([1, 1, 0, 0, 1, 1], dtype=bool)
    esc = oracle_router(slm, llm, rate=2 / 6)
    assert esc.tolist() == [False, True, False, False, True, False]
    # with more budget: neutral items next, never the one the LLM would break (index 3)
    esc = oracle_router(slm, llm, rate=5 / 6)
    assert not esc[3] and esc.sum() == 5
    assert accuracy_at(oracle_router(slm, llm, 2 / 6), slm, llm) == pytest.approx(5 / 6)


def test_random_router_expectation_matches_simulation():
    rng = np.random.default_rng(0)
    slm = rng.random(20000) < 0.85
    llm = np.ones(20000, dtype=bool)
    sims = [accuracy_at(rng.random(20000) < 0.1, slm, llm) for _ in range(20)]
    assert np.mean(sims) == pytest.approx(random_router_accuracy(slm, llm, 0.1), abs=0.002)


def test_uhlm_threshold_is_the_zero_crossing_of_the_linear_fit():
    u = np.linspace(0, 1, 101)
    beta = 0.8 * u - 0.06
    tau, a, b = uhlm_threshold(u, beta)
    assert (a, b) == pytest.approx((0.8, -0.06)) and tau == pytest.approx(0.075)


def test_threshold_curve_is_monotone_in_tau():
    rng = np.random.default_rng(1)
    u = rng.random(500)
    slm = rng.random(500) > u  # more uncertain, more often wrong
    curve = threshold_curve(u, slm, np.ones(500, dtype=bool), np.array([0.0, 0.5, 1.0]))
    assert curve[:, 0].tolist() == [pytest.approx(1.0, abs=0.01), pytest.approx(0.5, abs=0.1), 0.0]
    assert curve[0, 1] == 1.0 and curve[2, 1] == pytest.approx(slm.mean())

import numpy as np
import pytest

from fedhlm_app.routing.threshold import ThresholdConfig, exploration_mask, gradient, local_update, loss, personalize


@pytest.mark.parametrize("tau", [0.1, 0.35, 0.5, 0.8])
def test_gradient_matches_finite_difference(tau):
    rng = np.random.default_rng(1)
    h, beta = rng.random(300), rng.random(300)
    eps = 1e-6
    numeric = (loss(tau + eps, h, beta, 0.3, 20.0, 400) - loss(tau - eps, h, beta, 0.3, 20.0, 400)) / (2 * eps)
    assert gradient(tau, h, beta, 0.3, 20.0, 400) == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_threshold_falls_when_boundary_items_are_rejected_more_than_lambda():
    h = np.full(50, 0.5)
    cfg = ThresholdConfig(lam=0.2, lr=0.1, local_steps=5)
    assert local_update(0.5, h, np.ones(50), cfg, 50) < 0.5  # always rejected: escalate more
    assert local_update(0.5, h, np.zeros(50), cfg, 50) > 0.5  # never rejected: escalate less


def test_update_is_clipped_to_unit_interval():
    cfg = ThresholdConfig(lam=1.0, lr=100.0, local_steps=3)
    assert local_update(0.99, np.full(10, 0.99), np.zeros(10), cfg, 10) == 1.0
    cfg = ThresholdConfig(lam=0.0, lr=100.0, local_steps=3)
    assert local_update(0.01, np.full(10, 0.01), np.ones(10), cfg, 10) == 0.0


def test_fixed_point_escalates_where_rejection_exceeds_lambda():
    # beta rises with uncertainty; the learned tau sits where beta crosses lambda.
    h = np.linspace(0, 1, 2001)
    beta = h.copy()
    cfg = ThresholdConfig(kappa=30.0, lam=0.4, lr=0.5, local_steps=2000)
    assert local_update(0.9, h, beta, cfg, len(h)) == pytest.approx(0.4, abs=0.02)


def test_personalize_and_exploration():
    assert personalize(0.2, 0.6, 1.0) == 0.6
    assert personalize(0.2, 0.6, 0.0) == 0.2
    assert personalize(0.2, 0.6, 0.5) == pytest.approx(0.4)
    h = np.array([0.1, 0.35, 0.45, 0.9])
    assert exploration_mask(h, 0.5, 0.2).tolist() == [False, True, True, True]


def test_fedprox_term_keeps_tau_near_its_start():
    h, beta = np.linspace(0, 1, 50), np.zeros(50)  # never rejected: tau wants to rise
    steps = {mu: local_update(0.5, h, beta, ThresholdConfig(lam=0.3, lr=0.5, local_steps=20, proximal_mu=mu), 50) - 0.5
             for mu in (0.0, 1.0, 10.0, 1000.0)}
    assert steps[0.0] > steps[1.0] > steps[10.0] > steps[1000.0] > 0  # stable however large mu is

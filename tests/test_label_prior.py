"""The label-prior correction against Bayes' rule on a model whose posteriors are known exactly."""

import numpy as np
import pytest

from fedhlm_app.slm.label_prior import label_counts, likelier_prior, prior_of, shift_prior


def _posterior(x: np.ndarray, means: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Exact p(y | x) for unit-variance Gaussian classes with the given means and prior."""
    log_lik = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(axis=2)
    joint = np.exp(log_lik - log_lik.max(axis=1, keepdims=True)) * prior
    return joint / joint.sum(axis=1, keepdims=True)


def test_shifting_the_pooled_posterior_gives_the_clients_posterior():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, 3))
    x = rng.normal(size=(200, 3))
    pooled, own = np.array([0.25, 0.25, 0.3, 0.2]), np.array([0.7, 0.2, 0.05, 0.05])
    shifted = shift_prior(_posterior(x, means, pooled), own, pooled)
    np.testing.assert_allclose(shifted, _posterior(x, means, own), atol=1e-12)


def test_the_same_prior_changes_nothing():
    p = np.random.default_rng(1).dirichlet(np.ones(4), size=10)
    prior = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(shift_prior(p, prior, prior), p)


def test_counts_and_smoothing_keep_unseen_classes_possible():
    counts = label_counts(np.array([0, 0, 2]), 4)
    assert counts.tolist() == [2.0, 0.0, 1.0, 0.0]
    prior = prior_of(counts)
    assert prior.tolist() == pytest.approx([3 / 7, 1 / 7, 2 / 7, 1 / 7])
    shifted = shift_prior(np.full((1, 4), 0.25), prior, np.full(4, 0.25))
    assert shifted[0, 1] > 0 and shifted.argmax() == 0


def test_mismatched_class_counts_are_a_clear_error():
    with pytest.raises(ValueError, match="classes"):
        shift_prior(np.full((2, 4), 0.25), np.full(3, 1 / 3), np.full(4, 0.25))


@pytest.mark.parametrize("truth", ["own", "pooled"])
def test_the_queries_choose_the_prior_they_were_drawn_from(truth):
    rng = np.random.default_rng(2)
    means = 1.5 * rng.normal(size=(4, 3))
    pooled, own = np.full(4, 0.25), np.array([0.7, 0.2, 0.05, 0.05])
    labels = rng.choice(4, size=300, p=own if truth == "own" else pooled)
    x = means[labels] + rng.normal(size=(300, 3))
    chosen = likelier_prior(_posterior(x, means, pooled), own, pooled)
    assert chosen is (own if truth == "own" else pooled)

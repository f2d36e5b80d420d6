"""The label-prior correction against Bayes' rule on a model whose posteriors are known exactly."""

import numpy as np
import pytest

from fedhlm_app.slm.label_prior import causal_priors, label_counts, prior_of, shift_prior


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


def _stream(truth, n=300, seed=2):
    rng = np.random.default_rng(seed)
    means = 1.5 * rng.normal(size=(4, 3))
    pooled, own = np.full(4, 0.25), np.array([0.7, 0.2, 0.05, 0.05])
    mix = {"own": own, "pooled": pooled, "half": (own + pooled) / 2, "other": own[::-1]}[truth]
    labels = rng.choice(4, size=n, p=mix)
    x = means[labels] + rng.normal(size=(n, 3))
    return _posterior(x, means, pooled), labels, own, pooled, mix


@pytest.mark.parametrize("truth", ["own", "pooled", "half"])
def test_each_query_gets_the_mix_of_the_queries_before_it(truth):
    probs, _, own, pooled, mix = _stream(truth, n=1000)
    used = causal_priors(probs, own, pooled)
    np.testing.assert_array_equal(used[0], pooled)  # nothing seen yet
    assert np.abs(used[-50:] - mix).max() < 0.1  # the estimate has found the stream's mix
    # it leans to the pooled mix while the queries are few: never further from it later than earlier
    distance = np.abs(used - pooled).sum(axis=1)
    assert distance[:100].mean() <= distance[-100:].mean() + 1e-12
    # causal: a query's prior does not depend on the queries after it
    np.testing.assert_array_equal(causal_priors(probs[:120], own, pooled), used[:120])


@pytest.mark.parametrize("truth", ["own", "pooled", "half", "other"])
def test_the_causal_prior_is_never_much_worse_than_none(truth):
    accuracy = []
    for seed in range(5):
        probs, labels, own, pooled, _ = _stream(truth, seed=seed)
        adapted = probs * causal_priors(probs, own, pooled) / pooled
        accuracy.append(((adapted.argmax(axis=1) == labels).mean(), (probs.argmax(axis=1) == labels).mean()))
    with_prior, without = np.mean(accuracy, axis=0)
    assert with_prior >= without - 0.003  # a mix outside the own-to-pooled segment ("other") is left alone
    if truth == "own":
        assert with_prior > without + 0.02  # and it pays when the stream has the client's own mix

import numpy as np
import pytest

from fedhlm_app.routing.speculative import rejection_probability, residual_distribution, verify


def test_agreement_is_never_rejected():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=500)
    q = rng.dirichlet(np.ones(4), size=500)
    draft = p.argmax(1)
    agree = q[np.arange(500), draft] >= p[np.arange(500), draft]
    verdict = verify(p, q, draft, rng)
    assert np.all(verdict.beta[agree] == 0) and np.all(verdict.accepted[agree])
    assert np.all(verdict.final[agree] == draft[agree])


def test_rejection_resamples_only_where_q_exceeds_p():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(5), size=2000)
    q = rng.dirichlet(np.ones(5), size=2000)
    draft = p.argmax(1)
    verdict = verify(p, q, draft, rng)
    rejected = ~verdict.accepted
    assert rejected.sum() > 100
    rows = np.flatnonzero(rejected)
    assert np.all(q[rows, verdict.final[rows]] > p[rows, verdict.final[rows]])


def test_one_hot_llm_rejects_wrong_drafts_and_answers_its_label():
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    q = np.eye(3)[[1, 1]]
    verdict = verify(p, q, np.array([0, 1]), np.random.default_rng(0))
    assert verdict.beta.tolist() == [1.0, 0.0]
    assert verdict.final.tolist() == [1, 1]
    assert verdict.accepted.tolist() == [False, True]


def test_rejection_probability_and_residual_formulas():
    p = np.array([[0.5, 0.3, 0.2]])
    q = np.array([[0.25, 0.25, 0.5]])
    assert rejection_probability(p, q, np.array([0]))[0] == pytest.approx(0.5)
    assert residual_distribution(p, q)[0] == pytest.approx([0, 0, 1])


def test_acceptance_rate_matches_min_one_ratio():
    p = np.tile([[0.8, 0.2]], (20000, 1))
    q = np.tile([[0.4, 0.6]], (20000, 1))
    verdict = verify(p, q, np.zeros(20000, dtype=int), np.random.default_rng(3))
    assert verdict.accepted.mean() == pytest.approx(0.5, abs=0.02)


def test_verifying_every_drafted_token_leaves_the_llm_distribution_exact():
    """Speculative sampling over a toy vocabulary: drafts drawn from p, every one verified, the final
    tokens follow q (Pearson's chi-square against q; resampling from q instead of the residual
    gives a statistic of about 5,000)."""
    rng = np.random.default_rng(7)
    vocabulary, n = 12, 40000
    p_row, q_row = rng.dirichlet(np.ones(vocabulary)), rng.dirichlet(np.ones(vocabulary))
    p, q = np.tile(p_row, (n, 1)), np.tile(q_row, (n, 1))
    draft = rng.choice(vocabulary, size=n, p=p_row)
    final = verify(p, q, draft, rng).final
    observed = np.bincount(final, minlength=vocabulary)
    chi2 = float(((observed - n * q_row) ** 2 / (n * q_row)).sum())
    assert chi2 < 31.26  # the 99.9% quantile of chi-square with 11 degrees of freedom
    drafted = np.bincount(draft, minlength=vocabulary)  # the drafts themselves do not follow q: the test can tell
    assert float(((drafted - n * q_row) ** 2 / (n * q_row)).sum()) > 1000

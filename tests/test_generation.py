"""Token-level hybrid decoding (pure numpy): top-k drafts, exactness of the speculative rule,
the transmission policies and the threshold gradient on token feedback."""

import numpy as np
import pytest

from fedhlm_app.generation import policies
from fedhlm_app.generation.tokens import (
    PROB_BYTES,
    TOKEN_ID_BYTES,
    TopK,
    decode,
    greedy_fidelity,
    metrics,
    verify_greedy,
    verify_sampled,
)
from fedhlm_app.routing import threshold
from fedhlm_app.slm.uncertainty import margin

VOCAB = 12


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _bigram_models(seed=0, noise=1.0):
    """A toy drafter and the LLM it approximates: next-token distributions of the last token."""
    rng = np.random.default_rng(seed)
    llm_logits = rng.normal(0, 2, size=(VOCAB, VOCAB))
    draft_logits = llm_logits + rng.normal(0, noise, size=(VOCAB, VOCAB))
    last = lambda seqs: [s[-1] for s in seqs]  # noqa: E731
    return lambda seqs: (_softmax(draft_logits[last(seqs)]), _softmax(llm_logits[last(seqs)]))


def test_top_k_keeps_the_most_probable_tokens_as_they_travel():
    p = _softmax(np.random.default_rng(1).normal(size=(6, VOCAB)))
    top = TopK.of(p, 4)
    np.testing.assert_array_equal(np.sort(top.ids, axis=1), np.sort(np.argsort(-p, axis=1)[:, :4], axis=1))
    assert np.all(np.diff(top.probs, axis=1) <= 0)  # most probable first
    np.testing.assert_allclose(top.probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(top.probs, np.take_along_axis(p, top.ids, 1) / np.take_along_axis(p, top.ids, 1).sum(1, keepdims=True), atol=1e-3)
    assert top.nbytes == 6 * 4 * (TOKEN_ID_BYTES + PROB_BYTES)
    assert np.all(top.prob_of(top.ids[:, 0]) == top.probs[:, 0])
    with pytest.raises(ValueError):
        TopK.of(p, VOCAB + 1)


def test_verifying_top_k_drafts_leaves_the_llm_distribution_exact():
    """Drafts sampled from a top-5-of-12 distribution, every one verified: the final tokens follow q."""
    rng = np.random.default_rng(2)
    p = _softmax(rng.normal(0, 1.5, size=VOCAB))
    q = _softmax(rng.normal(0, 1.5, size=VOCAB))
    n = 60_000
    draft = TopK.of(np.tile(p, (n, 1)), 5)
    tokens = draft.sample(rng)
    final = verify_sampled(draft, np.tile(q, (n, 1)), tokens, rng).final
    observed = np.bincount(final, minlength=VOCAB)
    chi2 = float(np.sum((observed - n * q) ** 2 / (n * q)))
    assert chi2 < 31.3  # 99.9% quantile of chi-square with 11 degrees of freedom
    # without the verifier the drafts follow the truncated p, far from q
    drafted = np.bincount(tokens, minlength=VOCAB)
    assert float(np.sum((drafted - n * q) ** 2 / (n * q))) > 1000


def test_greedy_verification_keeps_the_llm_argmax():
    q = _softmax(np.random.default_rng(3).normal(size=(5, VOCAB)))
    drafts = q.argmax(axis=1).copy()
    drafts[[1, 3]] = (drafts[[1, 3]] + 1) % VOCAB
    verdict = verify_greedy(q, drafts)
    np.testing.assert_array_equal(verdict.final, q.argmax(axis=1))
    np.testing.assert_array_equal(verdict.beta, [0, 1, 0, 1, 0])


def _run(policy, greedy=True, seed=4, new_tokens=20):
    prompts = [[t] for t in range(VOCAB)]
    return decode(prompts, _bigram_models(), policy, margin, new_tokens, 4, greedy, np.random.default_rng(seed)), prompts


def test_policies_span_drafter_only_to_always_verify():
    (reference, _), _ = _run(policies.always())  # greedy, every token verified: the LLM's own
    (alone, alone_trace), _ = _run(policies.never())
    (oracle, oracle_trace), _ = _run(policies.oracle())
    always = metrics(_run(policies.always())[0][1], reference, reference)
    assert always["transmitted_share"] == 1.0 and always["greedy_fidelity"] == 1.0 and always["mean_tv_to_llm"] == 0.0
    solo = metrics(alone_trace, alone, reference)
    assert solo["transmitted_share"] == 0.0 and solo["uplink_draft_bytes"] == 0.0 and solo["greedy_fidelity"] < 0.9
    best = metrics(oracle_trace, oracle, reference)
    assert best["greedy_fidelity"] == 1.0  # the oracle sends exactly the tokens the LLM would change
    assert 0.0 < best["transmitted_share"] < 1.0 - solo["greedy_fidelity"] + 0.2
    assert best["rejection_rate"] == 1.0


def test_a_random_skip_transmits_its_rate_whatever_the_uncertainty():
    (_, trace), _ = _run(policies.at_random(0.3, np.random.default_rng(5)))
    sent, h = np.asarray(trace.transmitted), np.asarray(trace.uncertainty)
    assert abs(sent.mean() - 0.3) < 0.1
    assert sent[h < np.median(h)].any() and not sent[h > np.median(h)].all()


def test_a_threshold_transmits_the_uncertain_tokens_only():
    tau = 0.6
    (_, trace), _ = _run(policies.above(tau))
    h, sent = np.asarray(trace.uncertainty), np.asarray(trace.transmitted)
    np.testing.assert_array_equal(sent, h > tau)
    assert 0 < sent.mean() < 1


def test_sampled_decoding_verifies_into_the_llm_distribution():
    """Sampled mode, always verify: the hybrid draws every token from q (total variation 0); the
    drafter alone draws from its own top-k distribution, further from q."""
    (_, always), _ = _run(policies.always(), greedy=False)
    (_, alone), _ = _run(policies.never(), greedy=False)
    assert metrics(always, [], None)["mean_tv_to_llm"] == 0.0
    assert metrics(alone, [], None)["mean_tv_to_llm"] > 0.05


@pytest.mark.parametrize("tau", [0.2, 0.5, 0.8])
def test_threshold_gradient_on_token_feedback_matches_finite_differences(tau):
    """The thresholds learn from tokens exactly as from classes: the loss's gradient on the
    uncertainty and beta of decoded tokens equals a central finite difference."""
    (_, trace), _ = _run(policies.always(), greedy=False, new_tokens=10)
    h, beta = np.asarray(trace.uncertainty), np.asarray(trace.beta)
    assert 0 < beta.mean() < 1
    lam, kappa, eps = 0.3, 20.0, 1e-6
    numeric = (threshold.loss(tau + eps, h, beta, lam, kappa) - threshold.loss(tau - eps, h, beta, lam, kappa)) / (2 * eps)
    assert threshold.gradient(tau, h, beta, lam, kappa) == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_greedy_fidelity_compares_positions():
    assert greedy_fidelity([[1, 2, 3], [4, 5]], [[1, 0, 3], [4, 5]]) == pytest.approx(0.8)

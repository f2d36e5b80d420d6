"""Label-prior correction: a client adapts the global head to its own label mix (pure numpy).

Federated clients rarely see the pooled label distribution: under label skew each
device's queries follow its own mix of classes. The global head estimates
p_g(y | x) under the pooled prior pi_g(y); if a client's items share the class-
conditional densities p(x | y) but follow its prior pi_k(y), Bayes' rule gives its
posterior as p_k(y | x) proportional to p_g(y | x) * pi_k(y) / pi_g(y) (Saerens et al.,
Neural Computation 2002). pi_k is counted from the client's own labelled rows and
stays on the device; pi_g is the sum of every client's counts, which the server adds up.

The correction helps only if the client's queries do follow its training mix; if they
follow the pooled mix instead it does great harm (AG News, Dirichlet 0.5: 61% instead
of 88% accuracy). A device sees its queries as a stream, so the prior each query is
answered under is estimated from the queries before it only (``causal_priors``): EM on
their unlabelled head outputs (Saerens et al.), starting from the client's train mix,
and used only while it explains those queries clearly better than the pooled prior does.
"""

from __future__ import annotations

import numpy as np


def label_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """How many rows of each class ``labels`` holds."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)


def prior_of(counts: np.ndarray, smoothing: float = 1.0) -> np.ndarray:
    """The class prior of ``counts`` with add-``smoothing`` (Laplace) so that no class gets zero
    probability: a class a client has never seen can still be its answer."""
    counts = np.asarray(counts, dtype=np.float64) + smoothing
    return counts / counts.sum()


def shift_prior(probs: np.ndarray, local_prior: np.ndarray, global_prior: np.ndarray) -> np.ndarray:
    """``probs`` (rows over classes, under ``global_prior``) re-weighted to ``local_prior``."""
    if probs.shape[1:] != local_prior.shape or local_prior.shape != global_prior.shape:
        raise ValueError(f"probabilities over {probs.shape[1:]} classes, priors of shapes {local_prior.shape} and {global_prior.shape}")
    shifted = probs * (local_prior / global_prior)
    return shifted / shifted.sum(axis=1, keepdims=True)


def query_log_likelihood(probs: np.ndarray, prior: np.ndarray, global_prior: np.ndarray) -> float:
    """log p(queries) if their labels follow ``prior``, up to a constant that is the same for
    every prior: sum over queries of log sum_y p_g(y | x) prior(y) / global_prior(y)."""
    return float(np.sum(np.log(probs @ (prior / global_prior))))


PSEUDO_QUERIES = 10.0  # the train mix counts as this many queries in the estimate
EM_STEPS = 5  # per query, warm-started from the previous estimate


def em_prior(ratios: np.ndarray, start: np.ndarray, initial: np.ndarray, steps: int = EM_STEPS) -> np.ndarray:
    """The label prior of queries with head outputs ``ratios`` = p_g(y | x) / pi_g(y), by EM
    (Saerens et al. 2002) with the train mix ``start`` as ``PSEUDO_QUERIES`` prior queries."""
    prior = initial
    for _ in range(steps):
        posterior = ratios * prior
        posterior /= posterior.sum(axis=1, keepdims=True)
        prior = (PSEUDO_QUERIES * start + posterior.sum(axis=0)) / (PSEUDO_QUERIES + len(ratios))
    return prior


def causal_priors(probs: np.ndarray, own_prior: np.ndarray, global_prior: np.ndarray) -> np.ndarray:
    """The prior each query of a stream is answered under, from the queries before it only: the EM
    estimate when it makes them clearly likelier than ``global_prior`` does, else ``global_prior``
    (the first query, with nothing seen yet, gets ``global_prior``)."""
    ratios = probs / global_prior
    used = np.empty_like(probs)
    estimate = own_prior
    for t in range(len(probs)):
        seen = ratios[:t]
        # Log-likelihood ratio of the seen queries, estimate against the global prior (under which seen @ global_prior
        # = 1), which must exceed the estimate's C - 1 free parameters (Akaike): a fitted prior always explains its own
        # queries a little better, and on a pooled stream that noise would cost accuracy (without the penalty -0.5
        # points on tests/test_label_prior.py's pooled streams, with it -0.03).
        better = t > 0 and np.sum(np.log(seen @ estimate)) > len(estimate) - 1
        used[t] = estimate if better else global_prior
        estimate = em_prior(ratios[: t + 1], own_prior, estimate)
    return used

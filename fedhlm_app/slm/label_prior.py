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
answered under is estimated from the queries before it only (``causal_priors``): the
mix between its own and the pooled one closest to the pooled mix that still explains the
queries seen almost as well as the best one.
"""

from __future__ import annotations

import numpy as np

from fedhlm_app.slm.uncertainty import fit_temperature, with_temperature


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


MIX_GRID = np.linspace(0.0, 1.0, 21)  # weight of the pooled mix in a query stream's mix
# How much worse (in nats of log-likelihood) than the best mix the mix used may explain the queries
# seen: the mix used is the one closest to the pooled mix within this bound (a likelihood-ratio
# confidence region). Chosen on validation streams among 4-10 nats (docs/experiments/validation.md):
# smaller bounds gain more on streams in the client's own mix and lose more on mostly pooled ones.
CONFIDENCE_NATS = 6.0


def causal_priors(probs: np.ndarray, own_prior: np.ndarray, global_prior: np.ndarray,
                  confidence_nats: float = CONFIDENCE_NATS) -> np.ndarray:
    """The prior each query of a stream is answered under, from the queries before it only.

    The stream's mix is taken to lie between the client's own and the pooled one,
    (1 - w) own + w pooled, with Saerens et al.'s likelihood restricted to that segment (one
    parameter rather than C - 1: a free C-class estimate follows the head's miscalibration and
    cost accuracy on pooled streams). Of the mixes on ``MIX_GRID`` that explain the queries seen
    within ``confidence_nats`` of the best one, the one closest to the pooled mix is used: the
    pooled prior itself until the queries rule it out (the first query, with nothing seen, gets
    it too), and never more of the client's own mix than the queries support. ``probs`` should be
    calibrated (``calibrated``).
    """
    mixes = (1.0 - MIX_GRID)[:, None] * own_prior + MIX_GRID[:, None] * global_prior  # the last row is global_prior
    # Log-likelihood of the queries seen before each query, per candidate mix (under global_prior it is 0).
    seen = np.vstack([np.zeros(len(mixes)), np.cumsum(np.log((probs / global_prior) @ mixes.T), axis=0)[:-1]])[: len(probs)]
    plausible = seen >= seen.max(axis=1, keepdims=True) - confidence_nats
    closest_to_pooled = len(MIX_GRID) - 1 - np.argmax(plausible[:, ::-1], axis=1)
    return mixes[closest_to_pooled].reshape(probs.shape)


def calibrated(probs: np.ndarray, labelled_probs: np.ndarray, labels: np.ndarray, own_prior: np.ndarray,
               global_prior: np.ndarray) -> np.ndarray:
    """``probs`` with the temperature that fits the client's labelled rows best (their probabilities
    re-weighted to its own mix, which they follow): the mix estimate trusts the probabilities."""
    if len(labels) == 0:
        return probs
    return with_temperature(probs, fit_temperature(shift_prior(labelled_probs, own_prior, global_prior), labels))

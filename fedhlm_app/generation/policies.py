"""Which drafted tokens travel to the LLM: the policies the report compares (pure numpy).

Each returns a ``Transmit``: given a step of ``decode`` (the drafts' uncertainty, and for the oracle
whether the LLM would reject them), which tokens are sent.
"""

from __future__ import annotations

import numpy as np

from fedhlm_app.generation.tokens import Transmit


def never() -> Transmit:
    """The drafter alone."""
    return lambda step: np.zeros(len(step.drafts), bool)


def always() -> Transmit:
    """Always verify: standard speculative decoding, every token sent, the LLM's distribution exact."""
    return lambda step: np.ones(len(step.drafts), bool)


def above(tau: float) -> Transmit:
    """A threshold rule (FedHLM's learned tau, or U-HLM's fitted one): send when uncertainty > tau."""
    return lambda step: step.uncertainty > tau


def at_random(rate: float, rng: np.random.Generator) -> Transmit:
    """Send each token with probability ``rate``, whatever its uncertainty."""
    return lambda step: rng.random(len(step.drafts)) < rate


def oracle() -> Transmit:
    """Send exactly the tokens the LLM would reject (an upper bound no device can run)."""
    return lambda step: np.asarray(step.llm_rejects, bool)

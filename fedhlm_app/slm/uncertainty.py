"""Uncertainty measures of a class distribution, all scaled to [0, 1].

Each measure maps probabilities ``p`` of shape (n, C) to scores of shape (n,);
higher means less certain. Routing escalates an item when its score exceeds
the client's threshold. New measures register in ``MEASURES`` by name.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedhlm_app.slm.head import softmax

Measure = Callable[[np.ndarray], np.ndarray]


def normalized_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) / log C: 0 for a one-hot distribution, 1 for the uniform one."""
    p = np.asarray(p, dtype=np.float64)
    num_classes = p.shape[1]
    if num_classes < 2:
        return np.zeros(p.shape[0])
    terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.clip(-terms.sum(axis=1) / np.log(num_classes), 0.0, 1.0)


def least_confidence(p: np.ndarray) -> np.ndarray:
    """1 - max p, rescaled by C/(C-1) so the uniform distribution scores 1."""
    p = np.asarray(p, dtype=np.float64)
    c = p.shape[1]
    return np.clip((1.0 - p.max(axis=1)) * c / max(c - 1, 1), 0.0, 1.0)


def margin(p: np.ndarray) -> np.ndarray:
    """1 - (top-1 minus top-2 probability)."""
    top2 = np.sort(np.asarray(p, dtype=np.float64), axis=1)[:, -2:]
    return np.clip(1.0 - (top2[:, 1] - top2[:, 0]), 0.0, 1.0)


PERTURBATION_TEMPERATURES = np.linspace(0.0, 2.0, 21)[1:]  # theta in (0, 2], as U-HLM's re-implementations


def with_temperature(p: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the distribution the SLM's logits give at temperature T."""
    return softmax(np.log(np.maximum(np.asarray(p, dtype=np.float64), 1e-300)) / temperature)


TEMPERATURES = np.round(np.exp(np.linspace(np.log(0.25), np.log(4.0), 33)), 4)  # grid for temperature scaling


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the log loss of ``probs`` on ``labels`` over a grid.

    The loss is a sum over items, so clients can report their sums per grid point and the
    server add them up: the federated fit gives the same temperature as this pooled one.
    """
    rows = np.arange(len(labels))
    nll = [-np.sum(np.log(np.maximum(with_temperature(probs, t)[rows, labels], 1e-12))) for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(nll))])



def temperature_perturbation(p: np.ndarray) -> np.ndarray:
    """U-HLM's uncertainty: the share of tokens sampled at perturbed temperatures theta_k that
    differ from the draft, here in expectation (no sampling noise): mean_k 1 - p_theta_k(draft),
    rescaled by C/(C-1) so the uniform distribution scores 1."""
    p = np.asarray(p, dtype=np.float64)
    c = p.shape[1]
    draft = p.argmax(axis=1)
    rows = np.arange(len(p))
    disagreement = np.mean([1.0 - with_temperature(p, t)[rows, draft] for t in PERTURBATION_TEMPERATURES], axis=0)
    return np.clip(disagreement * c / max(c - 1, 1), 0.0, 1.0)


MEASURES: dict[str, Measure] = {
    "entropy": normalized_entropy,
    "least-confidence": least_confidence,
    "margin": margin,
    "temperature-perturbation": temperature_perturbation,
}


def get_measure(name: str) -> Measure:
    """The measure registered as ``name``."""
    try:
        return MEASURES[name]
    except KeyError:
        raise ValueError(f"unknown uncertainty measure '{name}' (known: {sorted(MEASURES)})") from None

"""Threshold learning from LLM rejection feedback.

An item with uncertainty H escalates when H > tau. The hard rule is relaxed to
r~ = sigmoid(kappa (H - tau)) and each client minimises

    L(tau) = mean_t [(1 - r~_t) beta_t + lambda r~_t]

(risk of keeping an answer the LLM would reject, plus the cost of escalating).
Its gradient is dL/dtau = (kappa / n) sum_t sigmoid'(z_t) (beta_t - lambda),
z_t = kappa (H_t - tau): near the boundary, if items are rejected more often
than lambda the threshold falls (escalate more), otherwise it rises.

Items whose feedback beta is unknown (never sent to the LLM because they lie
far below the threshold) are left out of the sum but kept in n: their
sigmoid' is negligible there, which is why clients also send an exploration
band of items just below tau.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def smooth_routing(h: np.ndarray, tau: float, kappa: float) -> np.ndarray:
    """Soft escalation probability r~ = sigmoid(kappa (H - tau))."""
    return sigmoid(kappa * (np.asarray(h, dtype=np.float64) - tau))


def loss(tau: float, h: np.ndarray, beta: np.ndarray, lam: float, kappa: float, n: int | None = None) -> float:
    """L(tau) over the items with known feedback, normalised by ``n`` (default: their count)."""
    r = smooth_routing(h, tau, kappa)
    total = np.sum((1.0 - r) * beta + lam * r)
    return float(total / (n or max(len(h), 1)))


def gradient(tau: float, h: np.ndarray, beta: np.ndarray, lam: float, kappa: float, n: int | None = None) -> float:
    """dL/dtau, exact for ``loss``."""
    r = smooth_routing(h, tau, kappa)
    total = np.sum(r * (1.0 - r) * (np.asarray(beta, dtype=np.float64) - lam))
    return float(kappa * total / (n or max(len(h), 1)))


@dataclass(frozen=True)
class ThresholdConfig:
    """Hyper-parameters of local threshold learning."""

    kappa: float = 20.0
    lam: float = 0.3
    lr: float = 1.0
    local_steps: int = 10
    tau_min: float = 0.0
    tau_max: float = 1.0
    proximal_mu: float = 0.0  # FedProx: mu/2 (tau - tau_start)^2 keeps tau near where the round started


def local_update(tau: float, h: np.ndarray, beta: np.ndarray, cfg: ThresholdConfig, n: int) -> float:
    """``local_steps`` clipped gradient steps on tau from ``tau`` (plus FedProx's proximal term)."""
    start, pull = tau, cfg.lr * cfg.proximal_mu
    for _ in range(cfg.local_steps):
        # The proximal term is stepped implicitly: an explicit step diverges once lr * mu > 2.
        stepped = (tau - cfg.lr * gradient(tau, h, beta, cfg.lam, cfg.kappa, n) + pull * start) / (1.0 + pull)
        tau = float(np.clip(stepped, cfg.tau_min, cfg.tau_max))
    return tau


def personalize(tau_local: float, tau_reference: float, alpha: float) -> float:
    """Start of the next round: (1 - alpha) tau_i + alpha tau_ref (alpha = 1 is plain FedAvg)."""
    return (1.0 - alpha) * tau_local + alpha * tau_reference


def exploration_mask(h: np.ndarray, tau: float, band: float) -> np.ndarray:
    """Items a client sends for feedback: escalated ones plus a band just below tau."""
    return np.asarray(h) > tau - band

"""What a round's strategy asks of the clients, and how a client applies it to its update.

A strategy's ``configure_train`` may put instructions for the clients into the round's config;
FedHLM's clients honour Flower's own:

- ``proximal-mu`` (``FedProx``): local training adds mu/2 ||w - w_start||^2 (head, encoder
  layers and threshold alike);
- ``clipping_norm`` (``DifferentialPrivacyClientSide*Clipping``): the update (w - w_start) is
  clipped to that L2 norm before it leaves the client, and the reply says whether it was clipped
  (``norm_bit``, which the adaptive wrapper needs to move the norm), with Flower's own functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT, compute_adaptive_clip_model_update

PROXIMAL_MU = "proximal-mu"


@dataclass(frozen=True)
class RoundConfig:
    """The instructions of one round a client acts on."""

    proximal_mu: float = 0.0
    clipping_norm: float | None = None

    @staticmethod
    def of(config: Mapping[str, Any]) -> RoundConfig:
        norm = config.get(KEY_CLIPPING_NORM)
        return RoundConfig(float(config.get(PROXIMAL_MU, 0.0)), None if norm is None else float(norm))

    def as_config(self) -> dict[str, float]:
        """The inverse of ``of``."""
        return {PROXIMAL_MU: self.proximal_mu, **({} if self.clipping_norm is None else {KEY_CLIPPING_NORM: self.clipping_norm})}

    def clipped(self, params: list[np.ndarray], start: list[np.ndarray], metrics: dict[str, float]) -> list[np.ndarray]:
        """``params`` with the update from ``start`` clipped to ``clipping_norm`` (unchanged without one);
        ``metrics`` gets the norm bit."""
        if self.clipping_norm is None:
            return params
        if not any(np.any(p != s) for p, s in zip(params, start)):  # no update (Flower's clipping divides by its norm)
            metrics[KEY_NORM_BIT] = 0
            return params
        clipped = [np.array(p, dtype=np.float64 if p.dtype.kind != "f" else p.dtype) for p in params]
        norm_bit = compute_adaptive_clip_model_update(clipped, [np.asarray(s) for s in start], self.clipping_norm)
        metrics[KEY_NORM_BIT] = int(norm_bit)
        return [c.astype(p.dtype, copy=False) for c, p in zip(clipped, params)]

"""The SLM's classification head: multinomial logistic regression in numpy.

The encoder is frozen, so the trainable SLM is this head on top of the cached
embeddings (unit-normalised). It follows scikit-learn's fit/predict shape;
``fit`` continues from the current weights (the federated starting point) with
a few epochs of mini-batch Adam, which is robust to the feature scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class HeadConfig:
    """Local training hyper-parameters."""

    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 64
    l2: float = 1e-4


class SoftmaxHead:
    """Linear softmax classifier: p = softmax(x W + b)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        self.weights = np.zeros((dim, num_classes))
        self.bias = np.zeros(num_classes)

    def get_params(self) -> list[np.ndarray]:
        return [self.weights.astype(np.float32), self.bias.astype(np.float32)]

    def set_params(self, params: list[np.ndarray]) -> "SoftmaxHead":
        weights, bias = (np.asarray(p, dtype=np.float64) for p in params)
        if weights.shape != self.weights.shape or bias.shape != self.bias.shape:
            raise ValueError(f"head shapes {weights.shape}, {bias.shape} != {self.weights.shape}, {self.bias.shape}")
        self.weights, self.bias = weights, bias
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(x @ self.weights + self.bias)

    def log_loss(self, x: np.ndarray, y: np.ndarray) -> float:
        if len(y) == 0:  # a client whose partition came out empty
            return 0.0
        p = self.predict_proba(x)[np.arange(len(y)), y]
        return float(-np.mean(np.log(np.maximum(p, 1e-12))))

    def fit(self, x: np.ndarray, y: np.ndarray, cfg: HeadConfig, rng: np.random.Generator) -> "SoftmaxHead":
        """Mini-batch Adam on cross-entropy + L2, starting from the current weights."""
        params = [self.weights, self.bias]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        b1, b2, eps, step = 0.9, 0.999, 1e-8, 0
        onehot = np.eye(self.weights.shape[1])[y]
        if len(y) == 0:
            return self
        for _ in range(cfg.epochs):
            for idx in np.array_split(rng.permutation(len(y)), max(1, len(y) // cfg.batch_size)):
                err = (self.predict_proba(x[idx]) - onehot[idx]) / len(idx)
                grads = [x[idx].T @ err + cfg.l2 * self.weights, err.sum(axis=0)]
                step += 1
                for i, g in enumerate(grads):
                    m[i] = b1 * m[i] + (1 - b1) * g
                    v[i] = b2 * v[i] + (1 - b2) * g * g
                    params[i] -= cfg.lr * (m[i] / (1 - b1**step)) / (np.sqrt(v[i] / (1 - b2**step)) + eps)
        return self

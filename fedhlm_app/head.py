"""The SLM's classification head in numpy: multinomial logistic regression, or a small MLP.

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
    """Softmax classifier on the embeddings: linear, p = softmax(x W + b), or with one hidden
    ReLU layer of ``hidden`` units, p = softmax(relu(x W1 + b1) W2 + b2).

    The linear head starts at zero; the hidden layer needs a random start (He
    initialisation, seeded), which the server draws once and sends to every client.
    """

    def __init__(self, dim: int, num_classes: int, hidden: int = 0, seed: int = 0) -> None:
        if hidden:
            rng = np.random.default_rng(seed)
            self.params = [rng.normal(0.0, np.sqrt(2.0 / dim), (dim, hidden)), np.zeros(hidden),
                           rng.normal(0.0, np.sqrt(1.0 / hidden), (hidden, num_classes)), np.zeros(num_classes)]
        else:
            self.params = [np.zeros((dim, num_classes)), np.zeros(num_classes)]

    def get_params(self) -> list[np.ndarray]:
        return [p.astype(np.float32) for p in self.params]

    def set_params(self, params: list[np.ndarray]) -> "SoftmaxHead":
        new = [np.asarray(p, dtype=np.float64) for p in params]
        if [p.shape for p in new] != [p.shape for p in self.params]:
            raise ValueError(f"head shapes {[p.shape for p in new]} != {[p.shape for p in self.params]}")
        self.params = new
        return self

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Hidden activations (None for the linear head) and class probabilities."""
        if len(self.params) == 2:
            return None, softmax(x @ self.params[0] + self.params[1])
        hidden = np.maximum(x @ self.params[0] + self.params[1], 0.0)
        return hidden, softmax(hidden @ self.params[2] + self.params[3])

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self._forward(x)[1]

    def log_loss(self, x: np.ndarray, y: np.ndarray) -> float:
        if len(y) == 0:  # a client whose partition came out empty
            return 0.0
        p = self.predict_proba(x)[np.arange(len(y)), y]
        return float(-np.mean(np.log(np.maximum(p, 1e-12))))

    def _gradients(self, x: np.ndarray, onehot: np.ndarray, l2: float) -> list[np.ndarray]:
        """Cross-entropy + L2 (on the weight matrices) gradients of one mini-batch."""
        hidden, probs = self._forward(x)
        err = (probs - onehot) / len(x)
        if hidden is None:
            return [x.T @ err + l2 * self.params[0], err.sum(axis=0)]
        back = (err @ self.params[2].T) * (hidden > 0)
        return [x.T @ back + l2 * self.params[0], back.sum(axis=0), hidden.T @ err + l2 * self.params[2], err.sum(axis=0)]

    def fit(self, x: np.ndarray, y: np.ndarray, cfg: HeadConfig, rng: np.random.Generator) -> "SoftmaxHead":
        """Mini-batch Adam on cross-entropy + L2, starting from the current weights."""
        if len(y) == 0:
            return self
        m = [np.zeros_like(p) for p in self.params]
        v = [np.zeros_like(p) for p in self.params]
        b1, b2, eps, step = 0.9, 0.999, 1e-8, 0
        onehot = np.eye(self.params[-1].shape[0])[y]
        for _ in range(cfg.epochs):
            for idx in np.array_split(rng.permutation(len(y)), max(1, len(y) // cfg.batch_size)):
                grads = self._gradients(x[idx], onehot[idx], cfg.l2)
                step += 1
                for i, g in enumerate(grads):
                    m[i] = b1 * m[i] + (1 - b1) * g
                    v[i] = b2 * v[i] + (1 - b2) * g * g
                    self.params[i] -= cfg.lr * (m[i] / (1 - b1**step)) / (np.sqrt(v[i] / (1 - b2**step)) + eps)
        return self

"""The SLM's classification head in numpy: multinomial logistic regression, or a small MLP.

The encoder is frozen, so the trainable SLM is this head on top of the cached
embeddings (unit-normalised), optionally plus a linear read-out of hashed word
n-gram bags (``fedhlm_app.slm.ngrams``). It follows scikit-learn's fit/predict shape;
``fit`` continues from the current weights (the federated starting point) with
a few epochs of mini-batch Adam, which is robust to the feature scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhlm_app.slm.ngrams import NgramBags


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
    proximal_mu: float = 0.0  # FedProx: mu/2 ||w - w_start||^2 keeps the local model near the one it started from


@dataclass(frozen=True)
class HeadInputs:
    """What the head reads for a set of items: unit embeddings and, optionally, n-gram bags."""

    x: np.ndarray
    bags: NgramBags | None = None

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, rows: np.ndarray) -> HeadInputs:
        return HeadInputs(self.x[rows], None if self.bags is None else self.bags[rows])


def as_inputs(x: HeadInputs | np.ndarray) -> HeadInputs:
    return x if isinstance(x, HeadInputs) else HeadInputs(np.asarray(x))


class SoftmaxHead:
    """Softmax classifier on the embeddings: linear, p = softmax(x W + b), or with one hidden
    ReLU layer of ``hidden`` units, p = softmax(relu(x W1 + b1) W2 + b2). With
    ``ngram_buckets``, the logits also get ``bags @ V`` (V last in ``params``).

    The linear parts start at zero; the hidden layer needs a random start (He
    initialisation, seeded), which the server draws once and sends to every client.
    """

    def __init__(self, dim: int, num_classes: int, hidden: int = 0, seed: int = 0, ngram_buckets: int = 0) -> None:
        self.hidden, self.ngram_buckets, self.num_classes = hidden, ngram_buckets, num_classes
        if hidden:
            rng = np.random.default_rng(seed)
            self.params = [rng.normal(0.0, np.sqrt(2.0 / dim), (dim, hidden)), np.zeros(hidden),
                           rng.normal(0.0, np.sqrt(1.0 / hidden), (hidden, num_classes)), np.zeros(num_classes)]
        else:
            self.params = [np.zeros((dim, num_classes)), np.zeros(num_classes)]
        if ngram_buckets:
            self.params.append(np.zeros((ngram_buckets, num_classes)))

    def get_params(self) -> list[np.ndarray]:
        return [p.astype(np.float32) for p in self.params]

    def set_params(self, params: list[np.ndarray]) -> SoftmaxHead:
        new = [np.asarray(p, dtype=np.float64) for p in params]
        if [p.shape for p in new] != [p.shape for p in self.params]:
            raise ValueError(f"head shapes {[p.shape for p in new]} != {[p.shape for p in self.params]}")
        self.params = new
        return self

    def _forward(self, inputs: HeadInputs) -> tuple[np.ndarray | None, np.ndarray]:
        """Hidden activations (None for the linear head) and class probabilities."""
        p = self.params
        if self.hidden:
            hidden = np.maximum(inputs.x @ p[0] + p[1], 0.0)
            logits = hidden @ p[2] + p[3]
        else:
            hidden, logits = None, inputs.x @ p[0] + p[1]
        if self.ngram_buckets:
            if inputs.bags is None or inputs.bags.buckets != self.ngram_buckets:
                raise ValueError(f"this head reads n-gram bags of {self.ngram_buckets} buckets")
            logits = logits + inputs.bags.dot(p[-1])
        return hidden, softmax(logits)

    def predict_proba(self, x: HeadInputs | np.ndarray) -> np.ndarray:
        return self._forward(as_inputs(x))[1]

    def log_loss(self, x: HeadInputs | np.ndarray, y: np.ndarray) -> float:
        if len(y) == 0:  # a client whose partition came out empty
            return 0.0
        p = self.predict_proba(x)[np.arange(len(y)), y]
        return float(-np.mean(np.log(np.maximum(p, 1e-12))))

    def gradients(self, inputs: HeadInputs | np.ndarray, onehot: np.ndarray, l2: float) -> list[np.ndarray]:
        """Cross-entropy + L2 (on the weight matrices) gradients of one mini-batch, in
        ``params`` order, all dense (for checking against finite differences; ``fit`` uses
        ``batch_gradients``)."""
        grads, ngram_rows = self.batch_gradients(as_inputs(inputs), onehot, l2)
        if ngram_rows is not None:
            rows, values = ngram_rows
            dense = l2 * self.params[-1]
            dense[rows] = values
            grads.append(dense)
        return grads

    def batch_gradients(self, inputs: HeadInputs, onehot: np.ndarray, l2: float
                         ) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
        """The embedding part's gradients, and the n-gram weights' gradient on the rows the
        batch contains (None without n-grams), L2 included: what ``fit`` steps on. A subclass may
        override it to change the local gradient (``bench/federated_head.py`` adds SCAFFOLD's
        drift correction)."""
        hidden, probs = self._forward(inputs)
        err = (probs - onehot) / len(inputs)
        dense = self._dense_gradients(inputs.x, hidden, err, l2)
        if not self.ngram_buckets:
            return dense, None
        rows, values = inputs.bags.gradient_rows(err)
        return dense, (rows, values + l2 * self.params[-1][rows])

    def _dense_gradients(self, x: np.ndarray, hidden: np.ndarray | None, err: np.ndarray, l2: float) -> list[np.ndarray]:
        """Gradients of the embedding part's parameters, given the output error ``err``."""
        if hidden is None:
            return [x.T @ err + l2 * self.params[0], err.sum(axis=0)]
        back = (err @ self.params[2].T) * (hidden > 0)
        return [x.T @ back + l2 * self.params[0], back.sum(axis=0), hidden.T @ err + l2 * self.params[2], err.sum(axis=0)]

    def fit(self, x: HeadInputs | np.ndarray, y: np.ndarray, cfg: HeadConfig, rng: np.random.Generator) -> SoftmaxHead:
        """Mini-batch Adam on cross-entropy + L2 (+ FedProx's proximal term), starting from the current weights.

        The n-gram weights get lazy Adam: a batch updates (and decays) only the rows
        of the buckets it contains, as torch's SparseAdam does, so a step costs the
        batch's n-grams, not all the buckets.
        """
        if len(y) == 0:
            return self
        inputs = as_inputs(x)
        adam = Adam(self.params, cfg.lr)
        onehot = np.eye(self.num_classes)[y]
        start = [p.copy() for p in self.params] if cfg.proximal_mu else None
        for _ in range(cfg.epochs):
            for idx in np.array_split(rng.permutation(len(y)), max(1, len(y) // cfg.batch_size)):
                grads, ngram_rows = self.batch_gradients(inputs[idx], onehot[idx], cfg.l2)
                adam.tick()
                for i, g in enumerate(grads):
                    adam.update(i, g if start is None else g + cfg.proximal_mu * (self.params[i] - start[i]))
                if ngram_rows is not None:
                    rows, g = ngram_rows
                    last = len(self.params) - 1
                    adam.update(last, g if start is None else g + cfg.proximal_mu * (self.params[last][rows] - start[last][rows]), rows)
        return self


def head_from_config(cfg: Mapping[str, Any], dim: int, num_classes: int, seed: int = 0) -> SoftmaxHead:
    """The head a run config describes (``head-hidden``, ``ngram-buckets``) on ``dim``-wide embeddings."""
    return SoftmaxHead(dim, num_classes, cfg.head_hidden, seed, cfg.ngram_buckets)


class Adam:
    """Adam over a list of arrays, updated in place; ``rows`` restricts an update to those rows."""

    def __init__(self, params: list[np.ndarray], lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> None:
        self.params, self.lr, self.b1, self.b2, self.eps, self.t = params, lr, b1, b2, eps, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def tick(self) -> None:
        self.t += 1

    def update(self, i: int, grad: np.ndarray, rows: np.ndarray | slice = slice(None)) -> None:
        m = self.b1 * self.m[i][rows] + (1 - self.b1) * grad
        v = self.b2 * self.v[i][rows] + (1 - self.b2) * grad * grad
        self.m[i][rows], self.v[i][rows] = m, v
        step = self.lr * (m / (1 - self.b1**self.t)) / (np.sqrt(v / (1 - self.b2**self.t)) + self.eps)
        self.params[i][rows] -= step

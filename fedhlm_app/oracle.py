"""The cloud LLM oracle: one small interface, backends chosen by name.

An oracle receives the items clients escalate (text, SLM distribution p,
draft class) and answers with its own distribution q, then speculative
verification (``speculative.verify``) turns (p, q, draft) into accept/reject,
the final class and the rejection probability beta used as feedback.

Backends implement ``distribution(texts) -> q``; ``verify`` is shared. The
``labels`` backend is the paper's simulated LLM: a ground-truth oracle that
answers each text with its dataset label as a one-hot q (it knows the labels
of every text of the configured dataset, train and test). Real models plug in
by registering a factory in ``BACKENDS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedhlm_app.data import Dataset
from fedhlm_app.features import text_keys
from fedhlm_app.speculative import Verdict, verify


class OracleError(RuntimeError):
    """The oracle could not answer a batch."""


@dataclass(frozen=True)
class EscalationBatch:
    """Items one client sends to the LLM."""

    ids: np.ndarray  # (n,) client-local item ids
    texts: list[str]
    probs: np.ndarray  # (n, C) SLM distribution p
    drafts: np.ndarray  # (n,) draft class

    def __len__(self) -> int:
        return len(self.ids)


class Oracle(ABC):
    """A cloud model that verifies SLM drafts."""

    def __init__(self, num_classes: int, seed: int) -> None:
        self.num_classes = num_classes
        self.rng = np.random.default_rng([seed, 7])

    @abstractmethod
    def distribution(self, texts: list[str]) -> np.ndarray:
        """The LLM's class distribution q for each text, shape (n, C)."""

    def verify(self, batch: EscalationBatch) -> Verdict:
        """Speculatively verify a batch of drafts."""
        if len(batch) == 0:
            empty = np.zeros(0)
            return Verdict(beta=empty, accepted=empty.astype(bool), final=empty.astype(np.int64))
        q = self.distribution(batch.texts)
        return verify(batch.probs, q, batch.drafts, self.rng)


class LabelsOracle(Oracle):
    """Ground-truth oracle: q is the one-hot dataset label of the text."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        super().__init__(dataset.num_classes, seed)
        self._label_of: dict[bytes, int] = {}
        for split in (dataset.train, dataset.test):
            for key, label in zip(text_keys(split.texts), split.labels):
                self._label_of[key.tobytes()] = int(label)

    def distribution(self, texts: list[str]) -> np.ndarray:
        labels = [self._label_of.get(k.tobytes(), -1) for k in text_keys(texts)]
        unknown = sum(1 for x in labels if x < 0)
        if unknown:
            raise OracleError(f"labels oracle: {unknown} of {len(texts)} texts are not in its dataset")
        return np.eye(self.num_classes)[labels]


OracleFactory = Callable[[Dataset, int], Oracle]
BACKENDS: dict[str, OracleFactory] = {"labels": LabelsOracle}


def make_oracle(name: str, dataset: Dataset, seed: int) -> Oracle:
    """Build the oracle backend registered as ``name``."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown oracle backend '{name}' (known: {sorted(BACKENDS)})") from None
    return factory(dataset, seed)

"""The cloud LLM oracle: one small interface, backends chosen by name.

An oracle receives the items clients escalate (text, SLM distribution p,
draft class) and answers with its own distribution q; speculative
verification (``speculative.verify``) turns (p, q, draft) into accept/reject,
the final class and the rejection probability beta used as feedback.

Backends implement ``distribution(texts) -> q``; ``verify`` is shared (the
``remote`` backend overrides it: its service verifies). A row of q that is not
a distribution (NaN, say) marks an item the backend could not answer.
``verify_safely`` never raises: items the oracle does not answer fall back to
the SLM draft, and the ``Verification`` says how many and why, so a run with a
broken oracle still finishes and reports it.

Backends (``BACKENDS``, imported only when chosen):
- ``labels``: the paper's simulated LLM, a ground-truth oracle answering each
  text with its dataset label as a one-hot q;
- ``noisy-labels``: ``labels`` wrong on a share 1 - ``oracle-accuracy`` of the texts
  (an imperfect LLM, for sensitivity experiments);
- ``classifier``: a ``transformers`` sequence classifier (``fedhlm_app.oracle.classifier``);
- ``causal-lm``: a generative model scoring each label word after a prompt
  (``fedhlm_app.oracle.causal_lm``);
- ``openai``: any OpenAI-compatible chat-completions server (``fedhlm_app.oracle.openai_chat``);
- ``remote``: FedHLM's own oracle service (``fedhlm_app.oracle.remote``).
"""

from __future__ import annotations

import hashlib
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhlm_app.data.datasets import Dataset
from fedhlm_app.paths import cache_dir
from fedhlm_app.routing.speculative import Verdict, verify
from fedhlm_app.slm.features import FeatureStore, text_keys

# Probabilities that sum to one within this tolerance are accepted as a distribution.
SUM_TOLERANCE = 1e-3


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

    @staticmethod
    def concat(batches: list[EscalationBatch], num_classes: int) -> EscalationBatch:
        """One batch of all items, in order (ids are kept as they are)."""
        return EscalationBatch(
            ids=np.concatenate([b.ids for b in batches]) if batches else np.zeros(0, np.int64),
            texts=[t for b in batches for t in b.texts],
            probs=np.concatenate([b.probs for b in batches]) if batches else np.zeros((0, num_classes)),
            drafts=np.concatenate([b.drafts for b in batches]) if batches else np.zeros(0, np.int64),
        )


@dataclass(frozen=True)
class Verification:
    """The oracle's verdicts on the items it answered; the others keep their SLM draft."""

    answered: np.ndarray  # (n,) bool
    verdict: Verdict  # over the answered items only, in batch order
    failure: str = ""  # why items went unanswered (empty when all were answered)
    q: np.ndarray | None = None  # (n, C) the LLM's distribution, NaN rows where unanswered (when known)

    @property
    def failed(self) -> int:
        return int(np.sum(~self.answered))

    @staticmethod
    def unanswered(n: int, cause: str) -> Verification:
        empty = np.zeros(0)
        return Verification(np.zeros(n, bool), Verdict(empty, empty.astype(bool), empty.astype(np.int64)), cause)

    def final_classes(self, drafts: np.ndarray) -> np.ndarray:
        """Each item's answer: the verified class where answered, else the draft (the fallback)."""
        final = np.asarray(drafts, dtype=np.int64).copy()
        final[self.answered] = self.verdict.final
        return final

    def take(self, start: int, stop: int) -> Verification:
        """The verification of items ``start:stop`` of the batch."""
        first, last = int(self.answered[:start].sum()), int(self.answered[:stop].sum())
        v = self.verdict
        part = Verdict(v.beta[first:last], v.accepted[first:last], v.final[first:last])
        answered = self.answered[start:stop]
        q = None if self.q is None else self.q[start:stop]
        return Verification(answered, part, self.failure if not answered.all() else "", q)


@dataclass
class Traffic:
    """Bytes a networked backend exchanged with its model server (HTTP bodies and headers)."""

    sent: int = 0
    received: int = 0
    requests: int = 0

    def drain(self) -> Traffic:
        """The counts so far, resetting them."""
        out = Traffic(self.sent, self.received, self.requests)
        self.sent = self.received = self.requests = 0
        return out


class CircuitBreaker:
    """Stops calling a failing model server: after ``limit`` consecutive failed requests, further
    requests fail at once (no connection, no retries) until ``reset``, which each phase does. A dead
    server then costs a phase ``limit`` requests' retries instead of retries for every item."""

    def __init__(self, limit: int = 3) -> None:
        self.limit, self.failures = limit, 0

    @property
    def open(self) -> bool:
        return self.failures >= self.limit

    def record(self, ok: bool) -> None:
        self.failures = 0 if ok else self.failures + 1

    def reset(self) -> None:
        self.failures = 0

    def why_open(self) -> str:
        return f"not called: its last {self.failures} requests failed (oracle-max-failures = {self.limit})"


class Oracle(ABC):
    """A cloud model that verifies SLM drafts."""

    def __init__(self, num_classes: int, seed: int) -> None:
        self.num_classes = num_classes
        self.rng = np.random.default_rng([seed, 7])
        self.traffic = Traffic()
        self.last_failure = ""  # a backend's note on why items went unanswered in the current call
        self.breaker: CircuitBreaker | None = None  # networked backends: shared with their HTTP client

    @abstractmethod
    def distribution(self, texts: list[str]) -> np.ndarray:
        """The LLM's class distribution q for each text, shape (n, C); NaN rows: no answer."""

    def verify(self, batch: EscalationBatch) -> Verification:
        """Speculatively verify a batch of drafts (raises when the whole batch fails)."""
        if len(batch) == 0:
            return Verification.unanswered(0, "")
        self.last_failure = ""
        q = np.asarray(self.distribution(batch.texts), dtype=np.float64)
        if q.shape != (len(batch), self.num_classes):
            raise OracleError(f"backend answered shape {q.shape}, expected {(len(batch), self.num_classes)}")
        answered = is_distribution(q)
        verdict = verify(batch.probs[answered], q[answered], batch.drafts[answered], self.rng)
        cause = "" if answered.all() else f"{int(np.sum(~answered))} items without a usable answer"
        if self.last_failure and cause:
            cause += f" (e.g. {self.last_failure})"
        return Verification(answered, verdict, cause, np.where(answered[:, None], q, np.nan))

    def close(self) -> None:  # noqa: B027 - an optional hook: most backends hold nothing to release
        """Release connections or processes (most backends hold none)."""


class ModelOracle(Oracle):
    """A backend that runs a model: answers are cached per text, on disk, so later rounds,
    policies and runs never recompute them. ``store_folder`` must identify the model and
    prompt (a different model or prompt gets a different folder)."""

    def __init__(self, num_classes: int, seed: int, store_folder: Path, batch_size: int) -> None:
        super().__init__(num_classes, seed)
        self.store = FeatureStore(store_folder)
        self.batch_size = batch_size

    @abstractmethod
    def compute(self, texts: list[str]) -> np.ndarray:
        """q for one batch of at most ``batch_size`` texts (NaN rows: no answer)."""

    def distribution(self, texts: list[str]) -> np.ndarray:
        keys = text_keys(texts)
        cached = self.store.get(keys)
        q = np.array([row if row is not None else np.full(self.num_classes, np.nan) for row in cached]).reshape(
            len(texts), self.num_classes
        )
        # Batches of texts of similar length waste less on padding (1.5x texts/s for MiniLM on a CPU, batches of 32).
        missing = sorted((i for i, row in enumerate(cached) if row is None), key=lambda i: len(texts[i]))
        for start in range(0, len(missing), self.batch_size):
            idx = missing[start : start + self.batch_size]
            fresh = np.asarray(self.compute([texts[i] for i in idx]), dtype=np.float64)
            q[idx] = fresh
            good = is_distribution(fresh)  # failed rows are asked again next time
            if good.any():
                self.store.put(keys[np.asarray(idx)[good]], fresh[good])
        return q


def store_folder(configured: str, backend: str, ident: str) -> Path:
    """The answer cache of one backend configuration: ``<cache root>/oracle-<backend>-<digest>``."""
    digest = hashlib.blake2b(ident.encode(), digest_size=8).hexdigest()
    return cache_dir(configured) / f"oracle-{backend}-{digest}"


def weights_stamp(files: list[Path]) -> str:
    """Name, size and mtime of weight files: a retrained model gets a fresh answer cache."""
    return ";".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files if f.exists())


def is_distribution(q: np.ndarray) -> np.ndarray:
    """Rows of q that are finite, non-negative and sum to one."""
    finite = np.all(np.isfinite(q), axis=1)
    safe = np.where(finite[:, None], q, 0.0)
    return finite & np.all(safe >= 0, axis=1) & (np.abs(safe.sum(axis=1) - 1.0) <= SUM_TOLERANCE)


def verify_safely(oracle: Oracle, batch: EscalationBatch) -> Verification:
    """``oracle.verify`` that never raises: whatever goes wrong, the items keep their SLM draft.
    Each call is a phase's batch: a networked backend's circuit breaker starts closed."""
    if oracle.breaker is not None:
        oracle.breaker.reset()
    try:
        return oracle.verify(batch)
    except Exception as exc:  # noqa: BLE001 - any backend failure must not end the run
        return Verification.unanswered(len(batch), f"{type(exc).__name__}: {exc}")


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


class NoisyLabelsOracle(LabelsOracle):
    """An LLM that is right on a share ``accuracy`` of the texts: the others get another class, at
    random but fixed per text (asked again, it gives the same wrong answer, as an LLM at
    temperature 0 would). For measuring what an imperfect LLM does to threshold learning."""

    def __init__(self, dataset: Dataset, seed: int, accuracy: float) -> None:
        super().__init__(dataset, seed)
        self.accuracy = accuracy
        self.salt = np.uint64(seed)

    def distribution(self, texts: list[str]) -> np.ndarray:
        truth = super().distribution(texts).argmax(axis=1)
        keys = text_keys(texts)  # a per-text stream of randomness: the same text gets the same answer
        draws = np.array([np.random.default_rng([int.from_bytes(k.tobytes()[:8], "little"), int(self.salt)]).random(2)
                          for k in keys]).reshape(len(texts), 2)
        wrong = draws[:, 0] >= self.accuracy
        other = (truth + 1 + (draws[:, 1] * (self.num_classes - 1)).astype(int)) % self.num_classes
        return np.eye(self.num_classes)[np.where(wrong, other, truth)]


def _labels(cfg: dict[str, Any], dataset: Dataset) -> Oracle:
    return LabelsOracle(dataset, cfg.seed)


def _noisy_labels(cfg: Any, dataset: Dataset) -> Oracle:
    return NoisyLabelsOracle(dataset, cfg.seed, cfg.oracle_accuracy)


@dataclass(frozen=True)
class Backend:
    """Where a backend's factory lives; imported only when the backend is chosen."""

    module: str
    factory: str
    summary: str
    check: str = ""  # a function of the module that checks the config without loading the model (``check_backend``)


BACKENDS: dict[str, Backend] = {
    "labels": Backend(__name__, "_labels", "ground truth of the dataset (the paper's simulated LLM)"),
    "noisy-labels": Backend(__name__, "_noisy_labels", "ground truth on a share oracle-accuracy of the texts, a wrong class on the others"),
    "classifier": Backend("fedhlm_app.oracle.classifier", "from_config", "a transformers sequence classifier", "check_config"),
    "causal-lm": Backend("fedhlm_app.oracle.causal_lm", "from_config", "a causal LM scoring each label word after a prompt",
                         "check_config"),
    "openai": Backend("fedhlm_app.oracle.openai_chat", "from_config", "an OpenAI-compatible chat-completions server", "check_config"),
    "remote": Backend("fedhlm_app.oracle.remote", "from_config", "FedHLM's oracle service (python -m fedhlm_app.oracle.service)",
                      "check_config"),
}


def check_backend(cfg: Any) -> None:
    """What can be checked of the configured backend without loading its model: its model is there,
    its server answers. Raises ``OracleError`` (or ``ConfigError``) saying what is wrong."""
    backend = BACKENDS[cfg.oracle]
    if backend.check:
        getattr(importlib.import_module(backend.module), backend.check)(cfg)


def make_oracle(cfg: dict[str, Any], dataset: Dataset) -> Oracle:
    """Build the oracle backend the run config names (``oracle``)."""
    name = cfg.oracle
    try:
        backend = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown oracle backend '{name}' (known: {sorted(BACKENDS)})") from None
    factory = getattr(importlib.import_module(backend.module), backend.factory)
    return factory(cfg, dataset)

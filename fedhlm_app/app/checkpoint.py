"""Crash safety: what a run has learned so far, written atomically after every round.

``results-dir/<run-name>/checkpoint.pkl`` holds a ``Progress``: the global head and, when
the encoder is fine-tuned, the encoder's trained layers (each with every cluster's
model after an edge round), the thresholds, the round histories, what every
client has been told by the LLM (its feedback cache and its threshold, keyed by
partition id, so a restarted federation with new node ids gets it back), and the
server's running state (ledger, failures, P2P prototypes, the strategy's state).
A run started with ``resume = true`` and the same ``run-name`` loads it and goes on
from the next round; the config must match the one that wrote it (keys that do not
change the result, such as timeouts, may differ). The file is written to a temporary
name and renamed, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedhlm_app.config import RunConfig
from fedhlm_app.fl.model_sync import ModelSync

CHECKPOINT_FILE = "checkpoint.pkl"
FORMAT = 5  # 5: P2P certifies peer answers from held-out evidence (``PeerCoordinator``)
# Keys that may differ between a run and its resume: they change how, not what, it computes.
RESUMABLE_CHANGES = ("resume", "round-timeout", "min-clients", "min-active-clients", "oracle-timeout", "oracle-retries",
                     "oracle-concurrency", "oracle-api-key", "oracle-url", "results-dir", "cache-dir", "data-dir")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message says why."""


@dataclass
class TrainedModel:
    """A model trained by federated rounds (the head, the encoder's top layers)."""

    done: int = 0  # rounds completed
    params: list[np.ndarray] | None = None  # the global model
    edge_params: dict[int, list[np.ndarray]] = field(default_factory=dict)  # cluster -> model after an edge round
    history: list[dict[str, Any]] = field(default_factory=list)  # per round: metrics, cloud or edge, seconds
    sync: ModelSync | None = None  # what each cluster's clients hold of it (their replicas), for compressed rounds


@dataclass
class Progress:
    """Everything a run has computed so far."""

    encoder: TrainedModel = field(default_factory=TrainedModel)
    head: TrainedModel = field(default_factory=TrainedModel)
    threshold_done: int = 0  # threshold rounds completed
    tau_global: float | None = None
    tau_edge: dict[int, float] = field(default_factory=dict)  # cluster -> threshold after an edge round
    rounds: list[dict[str, Any]] = field(default_factory=list)  # threshold rounds
    training_escalations: int = 0
    # partition id -> the LLM feedback the client holds ("ids", "beta", "final") and its "tau"
    clients: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)  # ledger, failures, peers, strategy state, ...

    def remember_feedback(self, partition: int, ids: np.ndarray, beta: np.ndarray, final: np.ndarray) -> None:
        """Append the verdicts a client received, as it appends them to its own cache."""
        known = self.clients.setdefault(partition, {})
        for key, values in (("ids", ids), ("beta", beta), ("final", final)):
            known[key] = np.concatenate([known[key], values]) if key in known else np.asarray(values).copy()

    def remember_tau(self, partition: int, tau: float) -> None:
        self.clients.setdefault(partition, {})["tau"] = np.array([tau])


def _fingerprint(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.as_dict().items() if k not in RESUMABLE_CHANGES}


def save(path: Path, cfg: RunConfig, progress: Progress) -> None:
    """Write atomically: a crash leaves either the old or the new checkpoint, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        pickle.dump({"format": FORMAT, "config": _fingerprint(cfg), "progress": progress}, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: Path, cfg: RunConfig) -> Progress | None:
    """The checkpoint at ``path`` (None when there is none); refuses one written by another config."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as fh:
            saved = pickle.load(fh)  # noqa: S301 - our own file, in the run's results folder
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({exc}); delete it or set resume = false") from exc
    if saved.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint '{path}' has format {saved.get('format')}, this version reads {FORMAT}")
    now = _fingerprint(cfg)
    differing = sorted(k for k in set(now) | set(saved["config"]) if now.get(k) != saved["config"].get(k))
    if differing:
        shown = ", ".join(f"{k}: {saved['config'].get(k)!r} -> {now.get(k)!r}" for k in differing[:5])
        raise CheckpointError(f"checkpoint '{path}' was written with another config ({shown}); "
                              "resume with the same config or use another run-name")
    return saved["progress"]

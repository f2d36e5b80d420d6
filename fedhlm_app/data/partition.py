"""Federated partitioning: Dirichlet label skew, query streams, clusters.

- Train rows go to ``N`` clients with flwr-datasets' ``DirichletPartitioner``
  (label skew controlled by ``alpha``; ``alpha = inf`` gives IID).
- Each client's queries are a stream like a device's (``query_streams``): every
  query's label is *sampled* from a mix of the client's own train label mix and
  the pooled one (``query-shift``: 0 own, 1 pooled), optionally drifting toward the
  pooled mix along the stream (``query-drift``), and its text is a test row of that
  label drawn at random (test rows are re-used by sampling). A client's queries
  thus follow its label mix only in expectation, as a device's would.
- Each client keeps a seeded calibration fraction of its train rows apart for
  threshold learning; the head is fitted on the rest.
- In simulation a client's cluster is a contiguous block of partition ids
  (``pid * M // N``); deployments set ``cluster-id`` in the node config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedhlm_app.config import RunConfig


@dataclass(frozen=True)
class ClientIndices:
    """Row indices (into the full train/test splits) owned by one client."""

    fit: np.ndarray
    calibration: np.ndarray
    test: np.ndarray  # the client's query stream, in order (rows may repeat)


def dirichlet_train_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_partition_size: int, max_tries: int = 11
) -> list[np.ndarray]:
    """Split train rows over clients with a Dirichlet(alpha) label skew.

    The algorithm of flwr-datasets' ``DirichletPartitioner`` (self-balancing: a client
    already above the average size gets no more rows; resampled until every client
    has ``min_partition_size`` rows), draw for draw, so partitions are identical to
    it (tests/test_partition.py checks this) without importing ``datasets`` in every
    client process, which took 3 s of each run.
    """
    if math.isinf(alpha):
        rng = np.random.default_rng(seed)
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_partitions)]
    rng = np.random.default_rng(seed)
    average_size = len(labels) / num_partitions
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for k in np.unique(labels):
            rows = np.flatnonzero(labels == k)
            shares = rng.dirichlet(np.full(num_partitions, float(alpha)))
            shares[[len(p) > average_size for p in parts]] = 0.0
            # A sequential sum, as flwr-datasets does, so that the cut points match to the last bit.
            cuts = (np.cumsum(shares / sum(shares.tolist())) * len(rows)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(rows, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_partition_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {len(labels)} rows over {num_partitions} clients gave every client "
        f"at least min-partition-size={min_partition_size} rows in {max_tries} tries; raise dirichlet-alpha or "
        "lower min-partition-size"
    )


def query_streams(test_labels: np.ndarray, train_parts: list[np.ndarray], train_labels: np.ndarray, shift: float,
                  drift: float, seed: int) -> list[np.ndarray]:
    """Each client's queries, in stream order, as rows of the test split.

    A client gets as many queries as its share of the train rows times the test size. Query t
    of n has its label drawn from ``(1 - s_t) * own + s_t * pooled`` with
    ``s_t = shift + (1 - shift) * drift * t / n`` (``own``: the client's train label mix;
    ``pooled``: every client's), then a test row of that label at random, with replacement.
    """
    num_classes = int(max(test_labels.max(), train_labels.max())) + 1
    counts = np.array([np.bincount(train_labels[p], minlength=num_classes) for p in train_parts], dtype=float)
    pooled = counts.sum(axis=0) / counts.sum()
    sums = counts.sum(axis=1, keepdims=True)
    own = np.divide(counts, sums, out=np.tile(pooled, (len(counts), 1)), where=sums > 0)  # (a client without rows gets no queries)
    rows_of = [np.flatnonzero(test_labels == k) for k in range(num_classes)]
    available = np.array([len(r) > 0 for r in rows_of])
    sizes = np.round(counts.sum(axis=1) / counts.sum() * len(test_labels)).astype(int)
    rng = np.random.default_rng([seed, 2])
    streams = []
    for mix, n in zip(own, sizes):
        s_t = shift + (1.0 - shift) * drift * np.arange(n) / max(n, 1)
        mixes = (1.0 - s_t)[:, None] * mix + s_t[:, None] * pooled
        mixes = np.where(available, mixes, 0.0)  # a class without test rows cannot be asked about
        mixes /= mixes.sum(axis=1, keepdims=True)
        labels = np.minimum((rng.random(n)[:, None] > np.cumsum(mixes, axis=1)).sum(axis=1), num_classes - 1)
        streams.append(np.array([rows_of[k][rng.integers(len(rows_of[k]))] for k in labels], dtype=np.int64))
    return streams


def calibration_split(rows: np.ndarray, fraction: float, seed: int, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a client's train rows into (fit, calibration) with a seeded shuffle."""
    rng = np.random.default_rng([seed, partition_id])
    shuffled = rng.permutation(rows)
    n_cal = int(round(fraction * len(rows)))
    return np.sort(shuffled[n_cal:]), np.sort(shuffled[:n_cal])


def partition_clients(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    calibration_fraction: float,
    min_partition_size: int,
    query_shift: float = 0.0,
    query_drift: float = 0.0,
) -> list[ClientIndices]:
    """All clients' row indices, deterministic given the arguments (``query_streams`` for the test rows)."""
    train_parts = dirichlet_train_partition(train_labels, num_clients, alpha, seed, min_partition_size)
    test_parts = query_streams(test_labels, train_parts, train_labels, query_shift, query_drift, seed)
    clients = []
    for pid, (train_rows, test_rows) in enumerate(zip(train_parts, test_parts)):
        fit, cal = calibration_split(train_rows, calibration_fraction, seed, pid)
        clients.append(ClientIndices(fit=fit, calibration=cal, test=test_rows))
    return clients


def configured_partitions(train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int, cfg: RunConfig) -> list[ClientIndices]:
    """``partition_clients`` with the run config's skew, seed, calibration share and minimum size."""
    return partition_clients(train_labels, test_labels, num_clients, cfg.dirichlet_alpha, cfg.seed,
                             cfg.calibration_fraction, cfg.min_partition_size, cfg.query_shift, cfg.query_drift)


def cluster_of_partition(partition_id: int, num_partitions: int, num_clusters: int) -> int:
    """Simulation rule: contiguous blocks of partition ids form a cluster."""
    return partition_id * num_clusters // num_partitions

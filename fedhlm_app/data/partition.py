"""Federated partitioning: Dirichlet label skew, matching test split, clusters.

- Train rows go to ``N`` clients with flwr-datasets' ``DirichletPartitioner``
  (label skew controlled by ``alpha``; ``alpha = inf`` gives IID).
- Test rows are split with the *same* label skew: each class's test rows are
  divided among clients in proportion to each client's share of that class in
  the train split, so a client's test label mix equals its train label mix.
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
    test: np.ndarray


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


def split_like(
    test_labels: np.ndarray, train_parts: list[np.ndarray], train_labels: np.ndarray, seed: int
) -> list[np.ndarray]:
    """Split test rows so each client's label mix matches its train partition."""
    num_clients = len(train_parts)
    classes = np.unique(np.concatenate([train_labels, test_labels]))
    counts = np.array([[np.sum(train_labels[p] == k) for k in classes] for p in train_parts], dtype=float)
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(num_clients)]
    for j, k in enumerate(classes):
        rows = rng.permutation(np.flatnonzero(test_labels == k))
        share = counts[:, j] / counts[:, j].sum() if counts[:, j].sum() else np.full(num_clients, 1 / num_clients)
        cuts = np.round(np.cumsum(share) * len(rows)).astype(int)[:-1]
        for client, chunk in enumerate(np.split(rows, cuts)):
            out[client].extend(chunk.tolist())
    return [np.sort(np.array(o, dtype=np.int64)) for o in out]


def split_pooled(num_test: int, train_parts: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """Split the test rows 0..num_test-1 at random, each client's share in proportion to its train
    partition: every client's queries follow the pooled label mix, whatever its own training labels."""
    sizes = np.array([len(p) for p in train_parts], dtype=float)
    rows = np.random.default_rng([seed, 1]).permutation(num_test)
    cuts = np.round(np.cumsum(sizes / sizes.sum()) * num_test).astype(int)[:-1]
    return [np.sort(chunk) for chunk in np.split(rows, cuts)]


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
    test_label_mix: str = "client",
) -> list[ClientIndices]:
    """All clients' row indices, deterministic given the arguments. ``test_label_mix``: "client"
    gives each client test items in its own label mix, "pooled" in the pooled one."""
    train_parts = dirichlet_train_partition(train_labels, num_clients, alpha, seed, min_partition_size)
    if test_label_mix == "pooled":
        test_parts = split_pooled(len(test_labels), train_parts, seed)
    else:
        test_parts = split_like(test_labels, train_parts, train_labels, seed)
    clients = []
    for pid, (train_rows, test_rows) in enumerate(zip(train_parts, test_parts)):
        fit, cal = calibration_split(train_rows, calibration_fraction, seed, pid)
        clients.append(ClientIndices(fit=fit, calibration=cal, test=test_rows))
    return clients


def configured_partitions(train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int, cfg: RunConfig) -> list[ClientIndices]:
    """``partition_clients`` with the run config's skew, seed, calibration share and minimum size."""
    return partition_clients(train_labels, test_labels, num_clients, cfg.dirichlet_alpha, cfg.seed,
                             cfg.calibration_fraction, cfg.min_partition_size, cfg.test_label_mix)


def cluster_of_partition(partition_id: int, num_partitions: int, num_clusters: int) -> int:
    """Simulation rule: contiguous blocks of partition ids form a cluster."""
    return partition_id * num_clusters // num_partitions

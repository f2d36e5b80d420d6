"""Hostile clients for robustness studies: the poisoned updates they send (pure numpy).

``hostile-clients = k`` makes the first k clients of every cluster (by partition id, in
simulation) send, every round, updates that pass every validity check (finite, right shapes,
thresholds in [0, 1]) yet pull the aggregate as far as they can:

- a threshold of 1.0: nothing above it is escalated, so the cluster's queries stop reaching the
  LLM and accuracy falls to the SLM's;
- a model update reversed and scaled (start - ``SCALE`` (trained - start)): gradient ascent.
"""

from __future__ import annotations

import numpy as np

POISONED_TAU = 1.0
SCALE = 10.0


def poisoned_model(trained: list[np.ndarray], start: list[np.ndarray]) -> list[np.ndarray]:
    """The reversed, scaled update of ``trained`` from ``start``, in ``trained``'s dtypes."""
    return [(s - SCALE * (t - s)).astype(t.dtype, copy=False) for t, s in zip(trained, start)]


def is_hostile(partition_id: int, cluster_members: list[int], hostile_per_cluster: int) -> bool:
    """Whether this partition is one of the first ``hostile_per_cluster`` of its cluster."""
    return partition_id in sorted(cluster_members)[:hostile_per_cluster]

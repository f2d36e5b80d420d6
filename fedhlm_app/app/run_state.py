"""What the phases of one run share on the server, and how it is checkpointed and resumed."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fedhlm_app.app import checkpoint
from fedhlm_app.app.exchange import Exchange
from fedhlm_app.app.protocol import ClientMemory, NodeInfo
from fedhlm_app.config import RunConfig
from fedhlm_app.fl.tiers import TieredAggregator
from fedhlm_app.oracle.base import Oracle
from fedhlm_app.reporting.ledger import Ledger
from fedhlm_app.routing.p2p import PeerCoordinator


@dataclass
class Run:
    """Everything the phases of one run share."""

    cfg: RunConfig
    exchange: Exchange
    oracle: Oracle
    info: dict[int, NodeInfo]  # node -> what it reported at setup (the nodes that passed it)
    aggregator: TieredAggregator
    peers: PeerCoordinator | None
    progress: checkpoint.Progress
    checkpoint_path: Path
    prototypes_sent: dict[int, np.ndarray] = field(default_factory=dict)  # node -> the prototypes it last received
    edge_prototypes_sent: dict[int, np.ndarray] = field(default_factory=dict)  # cluster -> what its edge last shared
    neighbour_prototypes_sent: dict[int, np.ndarray] = field(default_factory=dict)  # cluster -> neighbours' it last got
    oracle_failures: list[dict[str, Any]] = field(default_factory=list)  # one entry per batch with unanswered items

    @property
    def ledger(self) -> Ledger:
        return self.exchange.ledger

    # The phases read these per node: computed once (``info`` is set at setup; a node's cluster and
    # partition never change, re-reading its info after the encoder is installed keeps them).
    @cached_property
    def cluster_of(self) -> dict[int, int]:
        return {node: i.cluster_id for node, i in self.info.items()}

    @cached_property
    def partition_of(self) -> dict[int, int]:
        """node -> partition id (how a resumed run finds its clients again)."""
        return {node: i.partition_id for node, i in self.info.items()}

    @property
    def pooled_label_counts(self) -> np.ndarray | None:
        """The label counts the clients reported at setup, added up (None when they report none)."""
        counts = [np.asarray(i.label_counts, dtype=np.float64) for i in self.info.values() if i.label_counts]
        return np.sum(counts, axis=0) if counts else None

    def memory_of(self, node: int) -> ClientMemory | None:
        """What a resumed run's client had learned before the crash (None on a fresh run)."""
        held = self.progress.clients.get(self.partition_of[node])
        return ClientMemory.of(held) if held else None

    def save(self) -> None:
        """Checkpoint after a completed round (atomic)."""
        self.progress.server = {
            "ledger": self.ledger, "failures": self.exchange.failures, "peers": self.peers,
            "strategy": self.aggregator.state(), "oracle_failures": self.oracle_failures, "partition_of": self.partition_of,
        }
        checkpoint.save(self.checkpoint_path, self.cfg, self.progress)

    def restore_server_state(self) -> None:
        """After a resume: the saved failures, P2P state and aggregator state, on today's node ids."""
        for model in (self.progress.encoder, self.progress.head):
            if model.sync is not None:  # today's nodes hold no replica yet: each gets it whole first
                model.sync.forget_nodes()
        saved = self.progress.server
        if not saved:
            return
        self.exchange.failures[:0] = saved["failures"]
        self.oracle_failures[:0] = saved["oracle_failures"]
        self.aggregator.load_state(saved["strategy"])
        if self.peers is not None and saved["peers"] is not None:
            node_of_partition = {pid: node for node, pid in self.partition_of.items()}
            self.peers = saved["peers"]
            self.peers.rename_nodes({old: node_of_partition[pid] for old, pid in saved["partition_of"].items() if pid in node_of_partition})

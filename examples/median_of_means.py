"""An aggregation strategy of your own, for either tier: ``edge-strategy = "examples.median_of_means:MedianOfMeans"``.

Median of means: the replies are split into ``groups`` groups (in the order they arrive), each
group is averaged by sample count, and the result is the coordinate-wise median of the group
means. A hostile client can move only its own group's mean, so fewer than half the groups
poisoned cannot move the median beyond the honest groups' range, and unlike a plain median it
still averages within groups. Any ``flwr.serverapp.strategy.Strategy`` subclass works the same
way; subclassing ``FedAvg`` keeps its sampling, config and metric handling, and only
``aggregate_train`` changes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords


class MedianOfMeans(FedAvg):
    """FedAvg within each of ``groups`` groups of replies, then the coordinate-wise median across groups."""

    def __init__(self, groups: int = 3, **fedavg_args) -> None:
        super().__init__(**fedavg_args)
        if groups < 1:
            raise ValueError(f"groups = {groups}: need at least 1")
        self.groups = groups

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        groups = [g for g in np.array_split(np.arange(len(contents)), min(self.groups, len(contents))) if len(g)]
        means = [aggregate_arrayrecords([contents[i] for i in g], self.weighted_by_key) for g in groups]
        keys = list(means[0].keys())
        median = {k: np.median(np.stack([m[k].numpy() for m in means]), axis=0) for k in keys}
        return ArrayRecord({k: Array(median[k]) for k in keys}), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

"""A client's items: its partition of the dataset, featurized for the SLM, cached per process.

Where the rows come from:

- simulation (no ``data-path`` in the node config): the configured dataset, split over
  ``num-partitions`` clients by ``fedhlm_app.data.partition`` (the same split on every
  process, so a node's partition id names its rows);
- deployment (``data-path`` set): the node's own train/test CSVs in that folder; a seeded
  share of its train rows is kept for calibration.

A Ray actor serves many simulated nodes, so loaded and featurized partitions are cached
per process, keyed by the run config and the node's placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedhlm_app.config import RunConfig
from fedhlm_app.data.datasets import Dataset, Split, load_dataset, load_local
from fedhlm_app.data.partition import calibration_split, cluster_of_partition, partition_clients
from fedhlm_app.fl.attacks import is_hostile
from fedhlm_app.paths import cache_dir
from fedhlm_app.slm.features import EncoderSpec, featurize
from fedhlm_app.slm.head import HeadInputs, unit_rows
from fedhlm_app.slm.label_prior import label_counts
from fedhlm_app.slm.ngrams import NgramBags


@dataclass(frozen=True)
class Placement:
    """Where a node sits in the federation: its partition, its cluster and its own data folder (deployment)."""

    partition_id: int
    num_partitions: int
    cluster_id: int
    data_path: str = ""  # deployment: the node's CSV folder; empty: its partition of the configured dataset
    hostile: bool = False  # sends poisoned updates (``hostile-clients``; ``fedhlm_app.fl.attacks``)

    @staticmethod
    def of(node_config: dict, cfg: RunConfig) -> Placement:
        """Deployment: ``cluster-id`` (and ``data-path``, ``hostile``) from the node config; simulation:
        the cluster is a rule on the partition id, and the first ``hostile-clients`` of each are hostile.
        Once per process and node (a ClientApp reads it on every message; the rule walks every partition)."""
        return _placement(tuple(sorted(node_config.items())), cfg)


@lru_cache(maxsize=4096)
def _placement(node_items: tuple, cfg: RunConfig) -> Placement:
    node_config = dict(node_items)
    pid = int(node_config.get("partition-id", 0))
    n = int(node_config.get("num-partitions", cfg.num_clients))
    cluster = int(node_config["cluster-id"]) if "cluster-id" in node_config else cluster_of_partition(pid, n, cfg.num_clusters)
    members = [p for p in range(n) if cluster_of_partition(p, n, cfg.num_clusters) == cluster]
    hostile = bool(node_config.get("hostile", is_hostile(pid, members, cfg.hostile_clients)))
    return Placement(pid, n, cluster, str(node_config.get("data-path", "")), hostile)


@dataclass(frozen=True)
class LocalTexts:
    """A client's splits before featurization."""

    fit: Split
    calibration: Split
    test: Split
    num_classes: int

    def own_label_counts(self) -> np.ndarray:
        """The client's labelled rows (fit and calibration) per class: its label mix."""
        return label_counts(np.concatenate([self.fit.labels, self.calibration.labels]), self.num_classes)


@dataclass(frozen=True)
class LocalSplit:
    """A client's items of one split: unit embeddings, labels, texts and (optionally) hashed n-gram bags."""

    x: np.ndarray
    y: np.ndarray
    texts: list[str]
    bags: NgramBags | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def inputs(self) -> HeadInputs:
        """What the head reads."""
        return HeadInputs(self.x, self.bags)


@dataclass(frozen=True)
class LocalData:
    """A client's featurized splits."""

    fit: LocalSplit
    calibration: LocalSplit
    test: LocalSplit
    num_classes: int

    @property
    def dim(self) -> int:
        return int(self.fit.x.shape[1])


def _data_key(cfg: RunConfig) -> tuple:
    """The keys that decide the dataset: what is read, and how it is cut down."""
    return (cfg.data_source, cfg.hub_dataset, cfg.data_dir, cfg.train_file, cfg.test_file, cfg.max_train_items,
            cfg.max_test_items, cfg.query_pool, cfg.validation_fraction, cfg.seed)


def dataset(cfg: RunConfig) -> Dataset:
    """The configured dataset, truncated as configured, with validation rows of train as its test split when
    ``query-pool = "validation"`` (the ServerApp's labels oracle reads it too).
    Cached by the keys that decide it, so runs that differ only in other keys (the harness's runs, a
    ServerApp and its in-process clients) read and cut the files once."""
    return _dataset(_data_key(cfg))


@lru_cache(maxsize=2)
def _dataset(key: tuple) -> Dataset:
    source, hub, data_dir, train_file, test_file, max_train, max_test, pool, fraction, seed = key
    data = load_dataset(source, hub, data_dir, train_file, test_file).truncated(max_train, max_test, seed)
    return data.validation(fraction, seed) if pool == "validation" else data


def _partitions(cfg: RunConfig, num_partitions: int):
    return _cut(_data_key(cfg), num_partitions, cfg.dirichlet_alpha, cfg.calibration_fraction, cfg.min_partition_size,
                cfg.query_shift, cfg.query_drift)


@lru_cache(maxsize=2)
def _cut(key: tuple, num_partitions: int, alpha: float, calibration: float, min_size: int, shift: float, drift: float):
    ds, seed = _dataset(key), key[-1]
    return partition_clients(ds.train.labels, ds.test.labels, num_partitions, alpha, seed, calibration, min_size, shift, drift)


@lru_cache(maxsize=1024)  # a Ray actor serves many nodes: keep all of them (bench/rounds.py: 200)
def local_texts(cfg: RunConfig, placement: Placement) -> LocalTexts:
    """This node's splits, not featurized (all that encoder fine-tuning reads)."""
    if placement.data_path:
        ds = load_local(Path(placement.data_path), cfg.train_file, cfg.test_file)
        fit_rows, cal_rows = calibration_split(np.arange(len(ds.train)), cfg.calibration_fraction, cfg.seed, placement.partition_id)
        test_rows = np.arange(len(ds.test))
    else:
        ds = dataset(cfg)
        part = _partitions(cfg, placement.num_partitions)[placement.partition_id]
        fit_rows, cal_rows, test_rows = part.fit, part.calibration, part.test
    return LocalTexts(ds.train.subset(fit_rows), ds.train.subset(cal_rows), ds.test.subset(test_rows), ds.num_classes)


@lru_cache(maxsize=1024)
def local_data(cfg: RunConfig, placement: Placement, encoder: str = "") -> LocalData:
    """This node's data, featurized by ``encoder`` (a fine-tuned encoder's folder; empty: ``slm-model``)."""
    texts = local_texts(cfg, placement)
    spec = EncoderSpec(encoder or cfg.slm_model, cfg.max_length, cfg.precision, cfg.batch_tokens)

    def encode(split: Split, name: str) -> LocalSplit:
        x = featurize(split.texts, spec, cache_dir(cfg.cache_dir), progress=f"client {placement.partition_id} {name}")
        bags = NgramBags.of(split.texts, cfg.ngram_buckets) if cfg.ngram_buckets else None
        return LocalSplit(unit_rows(x), split.labels, split.texts, bags)

    return LocalData(encode(texts.fit, "fit"), encode(texts.calibration, "calibration"), encode(texts.test, "test"), texts.num_classes)

"""The run config: every key, its type, its allowed values, validated once.

Defaults live in ``pyproject.toml`` (``[tool.flwr.app.config]``) and presets
in ``conf/*.toml``. ``validate`` checks the whole config at start, before any
model or data loads, and raises ``ConfigError`` naming the key, the value and
what is allowed. Keys are kebab-case, as in Flower's examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

STRATEGIES = ("hierarchical-fedavg", "fedavg", "hierarchical-median", "hierarchical-trimmed-mean", "hierarchical-fedadam")
ORACLES = ("labels", "classifier", "causal-lm", "openai", "remote")
UNCERTAINTIES = ("entropy", "least-confidence", "margin", "temperature-perturbation")
DATA_SOURCES = ("auto", "hub", "local")
PRECISIONS = ("auto", "fp32", "bf16")
NEIGHBOUR_SCOPES = ("none", "all", "nearest")


class ConfigError(ValueError):
    """An invalid run-config value; the message names the key."""


@dataclass(frozen=True)
class Key:
    """One run-config key: its Python type and a check with a readable rule."""

    kind: type
    check: Callable[[Any], bool]
    rule: str


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _unit(v: Any) -> bool:
    return 0.0 <= v <= 1.0


def _one_of(options: tuple[str, ...]) -> Key:
    return Key(str, lambda v: v in options, f"one of {list(options)}")


SCHEMA: dict[str, Key] = {
    # run
    "run-name": Key(str, lambda v: "/" not in v and v not in {".", ".."}, "a plain name without '/' (empty: timestamp)"),
    "results-dir": Key(str, lambda v: True, "a folder path (empty: $FEDHLM_RESULTS_DIR or ./results)"),
    "resume": Key(bool, lambda v: True, "true or false (continue from results-dir/run-name/checkpoint.pkl)"),
    "seed": Key(int, _non_negative, "an integer >= 0"),
    "num-clients": Key(int, _positive, "an integer >= 1"),
    "num-clusters": Key(int, _positive, "an integer >= 1"),
    "min-clients": Key(int, _non_negative, "an integer >= 0 (0: all num-clients)"),
    "min-active-clients": Key(int, _positive, "an integer >= 1 (the run stops when fewer clients remain)"),
    "min-cluster-clients": Key(int, _positive, "an integer >= 1 (a cluster with fewer valid updates keeps its last aggregate)"),
    "round-timeout": Key(float, _positive, "seconds > 0"),
    # data
    "data-source": _one_of(DATA_SOURCES),
    "hub-dataset": Key(str, bool, "a Hub dataset name"),
    "data-dir": Key(str, lambda v: True, "a folder with the CSV files (empty: $FEDHLM_DATA_DIR)"),
    "train-file": Key(str, bool, "a CSV file name inside data-dir"),
    "test-file": Key(str, bool, "a CSV file name inside data-dir"),
    "max-train-items": Key(int, _non_negative, "an integer >= 0 (0: all)"),
    "max-test-items": Key(int, _non_negative, "an integer >= 0 (0: all)"),
    "dirichlet-alpha": Key(float, _positive, "a number > 0 ('inf' for IID)"),
    "min-partition-size": Key(int, _non_negative, "an integer >= 0"),
    "test-label-mix": _one_of(("client", "pooled")),
    "calibration-fraction": Key(float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
    # SLM
    "slm-model": Key(str, bool, "'minilm' (packaged all-MiniLM-L6-v2), 'mpnet' (packaged all-mpnet-base-v2), a Hub id or a local path"),
    "max-length": Key(int, lambda v: 8 <= v <= 512, "an integer in [8, 512]"),
    "precision": _one_of(PRECISIONS),
    "batch-tokens": Key(int, _positive, "an integer >= 1"),
    "cache-dir": Key(str, lambda v: True, "a folder (empty: $FEDHLM_CACHE_DIR or ~/.cache/fedhlm)"),
    "encoder-rounds": Key(int, _non_negative, "an integer >= 0 (0: the encoder stays frozen)"),
    "encoder-layers": Key(int, _positive, "an integer >= 1 (top layers fine-tuned)"),
    "encoder-steps": Key(int, _positive, "an integer >= 1 (local batches per round)"),
    "encoder-batch-size": Key(int, _positive, "an integer >= 1"),
    "encoder-lr": Key(float, _positive, "a number > 0"),
    "head-rounds": Key(int, _non_negative, "an integer >= 0"),
    "head-hidden": Key(int, _non_negative, "an integer >= 0 (0: linear head; else ReLU units of one hidden layer)"),
    "ngram-buckets": Key(int, lambda v: v == 0 or 2**10 <= v <= 2**24,
                         "0 (embedding only) or a number of n-gram hash buckets in [1024, 16777216]"),
    "head-epochs": Key(int, _positive, "an integer >= 1"),
    "head-lr": Key(float, _positive, "a number > 0"),
    "head-l2": Key(float, _non_negative, "a number >= 0"),
    "local-label-prior": Key(bool, lambda v: True, "true or false"),
    # thresholds
    "threshold-rounds": Key(int, _non_negative, "an integer >= 0"),
    "uncertainty": _one_of(UNCERTAINTIES),
    "tau-init": Key(float, _unit, "a number in [0, 1]"),
    "kappa": Key(float, _positive, "a number > 0"),
    "lambda": Key(float, _unit, "a number in [0, 1]"),
    "threshold-lr": Key(float, _positive, "a number > 0"),
    "threshold-local-steps": Key(int, _positive, "an integer >= 1"),
    "exploration-band": Key(float, _unit, "a number in [0, 1]"),
    "personalization-alpha": Key(float, _unit, "a number in [0, 1] (1: plain FedAvg)"),
    "static-threshold": Key(float, _unit, "a number in [0, 1]"),
    # peer-to-peer resolution
    "p2p": Key(bool, lambda v: True, "true or false"),
    "p2p-delta": Key(float, lambda v: -1.0 <= v <= 1.0, "a cosine in [-1, 1]"),
    "p2p-margin": Key(float, lambda v: 0.0 <= v <= 2.0, "a number in [0, 2]"),
    "p2p-neighbours": _one_of(NEIGHBOUR_SCOPES),
    "p2p-neighbour-k": Key(int, _positive, "an integer >= 1"),
    "p2p-cost": Key(float, _non_negative, "a number >= 0 (cost of a peer attempt, in LLM calls when llm-cost = 1)"),
    "llm-cost": Key(float, _positive, "a number > 0"),
    # aggregation and oracle
    "strategy": _one_of(STRATEGIES),
    "cloud-every": Key(int, _positive, "an integer >= 1 (edge rounds per cloud round)"),
    "server-lr": Key(float, _positive, "a number > 0 (cloud Adam step size)"),
    "trim-fraction": Key(float, lambda v: 0.0 <= v < 0.5, "a number in [0, 0.5) (share trimmed at each end)"),
    "oracle": _one_of(ORACLES),
    "oracle-model": Key(str, lambda v: True, "a model name or folder (see README, 'Cloud LLM backends')"),
    "oracle-url": Key(str, lambda v: v == "" or v.startswith(("http://", "https://")), "an http:// or https:// URL (or empty)"),
    "oracle-api-key": Key(str, lambda v: True, "a key (empty: $OPENAI_API_KEY for openai, $FEDHLM_ORACLE_TOKEN for remote)"),
    "oracle-timeout": Key(float, _positive, "seconds > 0"),
    "oracle-retries": Key(int, _non_negative, "an integer >= 0"),
    "oracle-concurrency": Key(int, _positive, "an integer >= 1"),
    "oracle-batch-size": Key(int, _positive, "an integer >= 1"),
    "oracle-few-shot": Key(int, _non_negative, "an integer >= 0 (examples per class in the prompt)"),
}


def _coerce(name: str, value: Any, key: Key) -> Any:
    if key.kind is float and isinstance(value, str) and value.strip().lower() in {"inf", "infinity"}:
        return math.inf
    if key.kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if key.kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if key.kind is str and isinstance(value, str):
        return value
    if key.kind is bool and isinstance(value, bool):
        return value
    raise ConfigError(f"run config '{name}' = {value!r}: must be {key.rule}")


def validate(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Check every key and the relations between keys; return typed values."""
    unknown = sorted(set(run_config) - set(SCHEMA))
    if unknown:
        raise ConfigError(f"run config: unknown keys {unknown}")
    missing = sorted(set(SCHEMA) - set(run_config))
    if missing:
        raise ConfigError(f"run config: missing keys {missing} (defaults live in pyproject.toml)")
    cfg: dict[str, Any] = {}
    for name, key in SCHEMA.items():
        value = _coerce(name, run_config[name], key)
        if not (isinstance(value, float) and math.isnan(value)) and key.check(value):
            cfg[name] = value
        else:
            raise ConfigError(f"run config '{name}' = {run_config[name]!r}: must be {key.rule}")
    if cfg["num-clusters"] > cfg["num-clients"]:
        raise ConfigError(
            f"run config 'num-clusters' = {cfg['num-clusters']}: must be <= num-clients ({cfg['num-clients']})"
        )
    if cfg["min-clients"] > cfg["num-clients"]:
        raise ConfigError(
            f"run config 'min-clients' = {cfg['min-clients']}: must be <= num-clients ({cfg['num-clients']})"
        )
    if cfg["resume"] and not cfg["run-name"]:
        raise ConfigError("run config 'resume' = true: needs a 'run-name' (the checkpoint is results-dir/run-name/checkpoint.pkl)")
    if cfg["min-active-clients"] > cfg["num-clients"]:
        raise ConfigError(
            f"run config 'min-active-clients' = {cfg['min-active-clients']}: must be <= num-clients ({cfg['num-clients']})"
        )
    return cfg

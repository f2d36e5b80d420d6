"""The run config as one typed, validated object: ``RunConfig``.

Defaults live only in ``pyproject.toml`` (``[tool.flwr.app.config]``), presets in
``conf/*.toml``. ``validate`` checks every key once, at start, before
any model or data loads, and raises ``ConfigError`` naming the key, the value and what is
allowed. Each field of ``RunConfig`` is one run-config key (kebab-case there, snake_case
here; ``lambda`` is ``lambda_``) and carries its own rule, so the schema is the class.
Keys that name a registered component (strategy, uncertainty measure, oracle backend) are
checked against that component's registry, the one place it is defined (a strategy given by
import path is imported, and its arguments tried, by the ServerApp before anything loads).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fedhlm_app.fl.compression import VALUE_FORMATS, Codec
from fedhlm_app.fl.strategies import DP_WRAPPERS, FLOWER_STRATEGIES, NO_EDGE, StrategyError, is_strategy_name, parse_args
from fedhlm_app.oracle.base import BACKENDS
from fedhlm_app.routing.peer_bound import PeerCosts
from fedhlm_app.slm.uncertainty import MEASURES

DATA_SOURCES = ("auto", "hub", "local")
PRECISIONS = ("auto", "fp32", "bf16")
NEIGHBOUR_SCOPES = ("none", "all", "nearest")
COMPRESSIONS = ("none", *VALUE_FORMATS)
RESUME_MODES = ("false", "true", "auto")  # auto: resume when a checkpoint exists, else start


class ConfigError(ValueError):
    """An invalid run-config value; the message names the key."""


STRATEGY_RULE = f"a Flower strategy, one of {sorted(FLOWER_STRATEGIES) + sorted(DP_WRAPPERS)}, or 'package.module:Class'"
ARGS_RULE = "the strategy's constructor arguments as a TOML inline table, e.g. '{eta = 0.01}' (empty: none)"


def _is_args_table(text: str) -> bool:
    try:
        parse_args(text)
    except StrategyError:
        return False
    return True


def _key(check: Callable[[Any], bool], rule: str) -> Any:
    """A field that is one run-config key: ``check`` accepts its value, ``rule`` says what is allowed."""
    return field(metadata={"check": check, "rule": rule})


def _anything(rule: str) -> Any:
    return _key(lambda v: True, rule)


def _one_of(options: typing.Iterable[str]) -> Any:
    options = tuple(options)
    return _key(lambda v: v in options, f"one of {list(options)}")


def _at_least(low: float, rule: str) -> Any:
    return _key(lambda v: v >= low, rule)


def _positive(rule: str) -> Any:
    return _key(lambda v: v > 0, rule)


def _unit(rule: str = "a number in [0, 1]") -> Any:
    return _key(lambda v: 0.0 <= v <= 1.0, rule)


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key, typed and validated (see pyproject.toml for what each one does)."""

    # run
    run_name: str = _key(lambda v: "/" not in v and v not in {".", "..", "latest"}, "a plain name without '/', not 'latest' (empty: timestamp)")
    results_dir: str = _anything("a folder path (empty: $FEDHLM_RESULTS_DIR or ./results)")
    resume: str = _one_of(RESUME_MODES)  # TOML booleans are read as "true" / "false"
    overwrite: bool = _anything("true or false (replace the results of an earlier run of the same run-name; a resume continues it)")
    seed: int = _at_least(0, "an integer >= 0")
    num_clients: int = _positive("an integer >= 1")
    num_clusters: int = _positive("an integer >= 1")
    min_clients: int = _at_least(0, "an integer >= 0 (0: all num-clients)")
    min_active_clients: int = _positive("an integer >= 1 (the run stops when fewer clients remain)")
    min_cluster_clients: int = _positive("an integer >= 1 (a cluster with fewer valid updates keeps its last aggregate)")
    round_timeout: float = _positive("seconds > 0")
    node_wait: float = _positive("seconds > 0 (how long setup waits for one more SuperNode before it stops)")
    # data
    data_source: str = _one_of(DATA_SOURCES)
    hub_dataset: str = _key(bool, "a Hub dataset name")
    data_dir: str = _anything("a folder with the CSV files (empty: $FEDHLM_DATA_DIR, else the bundled AG News)")
    train_file: str = _key(bool, "a CSV file name inside data-dir")
    test_file: str = _key(bool, "a CSV file name inside data-dir")
    max_train_items: int = _at_least(0, "an integer >= 0 (0: all)")
    max_test_items: int = _at_least(0, "an integer >= 0 (0: all)")
    dirichlet_alpha: float = _positive("a number > 0 ('inf' for IID)")
    min_partition_size: int = _at_least(0, "an integer >= 0")
    query_pool: str = _one_of(("test", "validation"))
    validation_fraction: float = _key(lambda v: 0.0 < v < 1.0, "a number in (0, 1)")
    query_shift: float = _unit("a number in [0, 1] (0: each client's queries follow its own label mix, 1: the pooled mix)")
    query_drift: float = _unit("a number in [0, 1] (how far the query mix moves toward the pooled mix along the stream)")
    calibration_fraction: float = _key(lambda v: 0.0 < v < 1.0, "a number in (0, 1)")
    # SLM
    slm_model: str = _key(bool, "'minilm' (packaged all-MiniLM-L6-v2), 'mpnet' (packaged all-mpnet-base-v2), a Hub id or a local path")
    max_length: int = _key(lambda v: 8 <= v <= 512, "an integer in [8, 512]")
    precision: str = _one_of(PRECISIONS)
    batch_tokens: int = _positive("an integer >= 1")
    cache_dir: str = _anything("a folder (empty: $FEDHLM_CACHE_DIR or ~/.cache/fedhlm)")
    encoder_rounds: int = _at_least(0, "an integer >= 0 (0: the encoder stays frozen)")
    encoder_layers: int = _positive("an integer >= 1 (top layers fine-tuned)")
    encoder_steps: int = _positive("an integer >= 1 (local batches per round)")
    encoder_batch_size: int = _positive("an integer >= 1")
    encoder_lr: float = _positive("a number > 0")
    head_rounds: int = _at_least(0, "an integer >= 0")
    head_hidden: int = _at_least(0, "an integer >= 0 (0: linear head; else ReLU units of one hidden layer)")
    ngram_buckets: int = _key(lambda v: v == 0 or 2**10 <= v <= 2**24, "0 (embedding only) or a number of n-gram hash buckets in [1024, 16777216]")
    head_epochs: int = _positive("an integer >= 1")
    head_lr: float = _positive("a number > 0")
    head_l2: float = _at_least(0, "a number >= 0")
    local_label_prior: bool = _anything("true or false")
    # thresholds
    threshold_rounds: int = _at_least(0, "an integer >= 0")
    uncertainty: str = _one_of(MEASURES)
    tau_init: float = _unit()
    kappa: float = _positive("a number > 0")
    lambda_: float = _unit()
    threshold_lr: float = _positive("a number > 0")
    threshold_local_steps: int = _positive("an integer >= 1")
    exploration_band: float = _unit()
    personalization_alpha: float = _unit("a number in [0, 1] (1: plain FedAvg)")
    static_threshold: float = _unit()
    # peer-to-peer resolution
    p2p: bool = _anything("true or false")
    p2p_max_error: float = _key(lambda v: 0.0 < v < 1.0, "a number in (0, 1) (the largest accepted probability that a peer answer is wrong)")
    p2p_neighbours: str = _one_of(NEIGHBOUR_SCOPES)
    p2p_neighbour_k: int = _positive("an integer >= 1")
    p2p_cost: float = _at_least(0, "a number >= 0 (cost of a peer attempt, in LLM calls when llm-cost = 1)")
    llm_cost: float = _positive("a number > 0")
    p2p_error_cost: float = _at_least(0, "a number >= 0 (cost of a wrong peer answer, in LLM calls when llm-cost = 1)")
    p2p_beat_threshold: bool = _anything("true or false (true: peers only where they answer better than raising the threshold would)")
    # aggregation and oracle
    edge_strategy: str = _key(lambda v: v == NO_EDGE or is_strategy_name(v), f"'{NO_EDGE}' (flat: no edge tier) or {STRATEGY_RULE}")
    edge_strategy_args: str = _key(_is_args_table, ARGS_RULE)
    cloud_strategy: str = _key(is_strategy_name, STRATEGY_RULE)
    cloud_strategy_args: str = _key(_is_args_table, ARGS_RULE)
    cloud_every: int = _positive("an integer >= 1 (edge rounds per cloud round)")
    compression: str = _one_of(COMPRESSIONS)
    upload_share: float = _key(lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
    broadcast_share: float = _key(lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
    hostile_clients: int = _at_least(0, "an integer >= 0 (per cluster: clients that send poisoned updates, for robustness studies)")
    oracle: str = _one_of(BACKENDS)
    oracle_model: str = _anything("a model name or folder (see docs/guide.md, 'Cloud LLM backends')")
    oracle_accuracy: float = _key(lambda v: 0.0 < v <= 1.0, "a number in (0, 1] (noisy-labels: how often its answer is the label)")
    oracle_url: str = _key(lambda v: v == "" or v.startswith(("http://", "https://")), "an http:// or https:// URL (or empty)")
    oracle_api_key: str = _anything("a key (empty: $OPENAI_API_KEY for openai, $FEDHLM_ORACLE_TOKEN for remote)")
    oracle_timeout: float = _positive("seconds > 0")
    oracle_retries: int = _at_least(0, "an integer >= 0")
    oracle_concurrency: int = _positive("an integer >= 1")
    oracle_batch_size: int = _positive("an integer >= 1")
    oracle_few_shot: int = _at_least(0, "an integer >= 0 (examples per class in the prompt)")
    oracle_max_failures: int = _positive("an integer >= 1 (consecutive failed requests before a phase stops calling the oracle)")
    oracle_required: bool = _anything("true or false (false: a run whose oracle never answered still exits 0)")

    def _check_relations(self) -> None:
        for key in ("num-clusters", "min-clients", "min-active-clients"):
            value = getattr(self, attribute(key))
            if value > self.num_clients:
                raise ConfigError(f"run config '{key}' = {value}: must be <= num-clients ({self.num_clients})")
        if self.resuming and not self.run_name:
            raise ConfigError(f"run config 'resume' = {self.resume}: needs a 'run-name' (the checkpoint is results-dir/run-name/checkpoint.pkl)")

    @property
    def peer_costs(self) -> PeerCosts:
        """What the opportunistic P2P rule weighs: a peer attempt, an LLM call, a wrong peer answer."""
        return PeerCosts(self.p2p_cost, self.llm_cost, self.p2p_error_cost)

    @property
    def upload_codec(self) -> Codec | None:
        """How clients and edges compress their updates (None: whole models)."""
        return None if self.compression == "none" else Codec(self.compression, self.upload_share)

    @property
    def broadcast_codec(self) -> Codec | None:
        """How the server compresses what it sends the clients (None: whole models)."""
        return None if self.compression == "none" else Codec(self.compression, self.broadcast_share)

    @property
    def resuming(self) -> bool:
        """Whether a checkpoint is continued (``resume`` true, or auto)."""
        return self.resume != "false"

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (snake_case names), validated again."""
        return validate({**self.as_dict(), **{key_names()[k]: v for k, v in changes.items()}})

    def as_dict(self) -> dict[str, Any]:
        """The run config as Flower holds it: kebab-case keys, TOML types (``resume`` a boolean unless 'auto')."""
        values = {key: getattr(self, name) for name, key in key_names().items()}
        values["resume"] = {"true": True, "false": False}.get(self.resume, self.resume)
        return values


def validate(run_config: Mapping[str, Any] | RunConfig) -> RunConfig:
    """Check every key and the relations between keys; return the typed config (``ConfigError`` names what is wrong)."""
    if isinstance(run_config, RunConfig):
        return run_config
    names = key_names()
    unknown = sorted(set(run_config) - set(names.values()))
    if unknown:
        raise ConfigError(f"run config: unknown keys {unknown}")
    missing = sorted(set(names.values()) - set(run_config))
    if missing:
        raise ConfigError(f"run config: missing keys {missing} (defaults live in pyproject.toml)")
    hints = typing.get_type_hints(RunConfig)
    values = {}
    for f in dataclasses.fields(RunConfig):
        key, raw = names[f.name], run_config[names[f.name]]
        value = _coerce(key, raw, hints[f.name], f.metadata["rule"])
        if (isinstance(value, float) and math.isnan(value)) or not f.metadata["check"](value):
            raise ConfigError(f"run config '{key}' = {raw!r}: must be {f.metadata['rule']}")
        values[f.name] = value
    cfg = RunConfig(**values)
    cfg._check_relations()
    return cfg


@lru_cache(maxsize=1)
def key_names() -> dict[str, str]:
    """Field name -> run-config key, in declaration order."""
    return {f.name: f.name.rstrip("_").replace("_", "-") for f in dataclasses.fields(RunConfig)}


def attribute(key: str) -> str:
    """The ``RunConfig`` field of a run-config key."""
    return {key: name for name, key in key_names().items()}[key]


def _coerce(key: str, value: Any, kind: type, rule: str) -> Any:
    if kind is float and isinstance(value, str) and value.strip().lower() in {"inf", "infinity"}:
        return math.inf
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (str, bool) and type(value) is kind:
        return value
    if key == "resume" and isinstance(value, bool):  # resume = true / false, as TOML writes it
        return str(value).lower()
    raise ConfigError(f"run config '{key}' = {value!r}: must be {rule}")


@lru_cache(maxsize=8)
def _cached(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return validate(dict(items))


def run_config_of(run_config: Mapping[str, Any]) -> RunConfig:
    """``validate``, once per process and config (ClientApps see the run config on every message)."""
    return _cached(tuple(sorted(run_config.items())))

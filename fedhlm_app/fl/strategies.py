"""Which aggregation strategy each tier runs: any Flower strategy, by name or by import path.

The edge tier (one aggregation per cluster) and the cloud tier (over the edge results, or
over every client when there is no edge tier) each run a ``flwr.serverapp.strategy.Strategy``:

- a name from ``FLOWER_STRATEGIES`` (``"FedAvg"``, ``"Krum"``, ``"FedAdam"``, ...), or one of
  Flower's differential-privacy wrappers (``DP_WRAPPERS``) around another strategy;
- or a user's own ``Strategy`` subclass by import path, ``"my_package.module:MyStrategy"``.

Constructor arguments come from the run config as a TOML inline table
(``cloud-strategy-args = "{eta = 0.01, tau = 0.001}"``). A DP wrapper takes the strategy it
wraps as ``strategy = "FedAvg"`` (and that one's arguments as ``strategy-args = {...}``).
FedHLM's phases choose which clients train each round (all of them), so the sampling
arguments (``min_*_nodes``) default to 1 rather than Flower's 2: a cluster may hold a single
client; a DP wrapper's ``num_sampled_clients`` defaults to the number of replies its tier
aggregates (the cluster's clients at the edge, the clusters at the cloud).
"""

from __future__ import annotations

import importlib
import inspect
import tomllib
from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

FLOWER_STRATEGIES: dict[str, type[Strategy]] = {cls.__name__: cls for cls in (
    FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan, QFedAvg)}
DP_WRAPPERS: dict[str, type[Strategy]] = {cls.__name__: cls for cls in (
    DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping, DifferentialPrivacyClientSideAdaptiveClipping)}
NO_EDGE = "none"  # edge-strategy = "none": no edge tier, the cloud strategy aggregates every client (flat)
SAMPLING_ARGS = ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes")

StrategyFactory = Callable[[int], Strategy]  # replies the tier aggregates -> a fresh strategy


class StrategyError(ValueError):
    """A strategy name, import path or argument table that cannot build a strategy."""


def is_strategy_name(name: str) -> bool:
    """Whether ``name`` names a strategy in form (a registered name or ``module:Class``); ``strategy_class`` imports it."""
    if name in FLOWER_STRATEGIES or name in DP_WRAPPERS:
        return True
    module, _, attribute = name.partition(":")
    return bool(module) and attribute.isidentifier() and all(part.isidentifier() for part in module.split("."))


def strategy_class(name: str) -> type[Strategy]:
    """The strategy class ``name`` refers to."""
    if name in FLOWER_STRATEGIES:
        return FLOWER_STRATEGIES[name]
    if name in DP_WRAPPERS:
        return DP_WRAPPERS[name]
    if not is_strategy_name(name):
        raise StrategyError(f"strategy '{name}': not one of {sorted(FLOWER_STRATEGIES) + sorted(DP_WRAPPERS)} "
                            "and not an import path 'package.module:Class'")
    module_name, _, attribute = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise StrategyError(f"strategy '{name}': cannot import it ({err})") from err
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise StrategyError(f"strategy '{name}': {cls!r} is not a subclass of flwr.serverapp.strategy.Strategy")
    return cls


def parse_args(text: str) -> dict[str, Any]:
    """A TOML inline table (``"{eta = 0.01}"``; empty: no arguments) as keyword arguments."""
    try:
        args = tomllib.loads(f"args = {text.strip() or '{}'}")["args"]
    except tomllib.TOMLDecodeError as err:
        raise StrategyError(f"strategy arguments {text!r}: not a TOML inline table such as '{{eta = 0.01}}' ({err})") from err
    if not isinstance(args, dict):
        raise StrategyError(f"strategy arguments {text!r}: not a TOML inline table such as '{{eta = 0.01}}'")
    return args


def build(name: str, args: dict[str, Any], replies: int) -> Strategy:
    """A fresh strategy ``name`` with ``args`` for a tier that aggregates ``replies`` replies per round."""
    cls = strategy_class(name)
    args = dict(args)
    if name in DP_WRAPPERS:
        inner = args.pop("strategy", "FedAvg")
        args["strategy"] = build(inner, args.pop("strategy-args", {}), replies)
        args.setdefault("num_sampled_clients", replies)
    parameters = inspect.signature(cls).parameters
    for key in SAMPLING_ARGS:
        if key in parameters:
            args.setdefault(key, 1)
    try:
        return cls(**args)
    except (TypeError, ValueError) as err:
        raise StrategyError(f"strategy '{name}' with arguments {args}: {err}; it takes {inspect.signature(cls)}") from err


def factory(name: str, args_text: str) -> StrategyFactory:
    """Builds strategy ``name`` with the arguments of ``args_text``; raises ``StrategyError`` now if it cannot."""
    args = parse_args(args_text)
    build(name, args, replies=1)  # fail at start, naming the strategy, not in the first round
    return lambda replies: build(name, args, replies)

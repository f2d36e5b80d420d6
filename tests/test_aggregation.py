"""Edge-then-cloud aggregation delegates to Flower's strategies: FedHLM's numbers are Flower's exactly."""

import pickle
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedhlm_app import config
from fedhlm_app.fl import strategies
from fedhlm_app.fl.tiers import NodeUpdate, Tiers
from fedhlm_app.fl.updates import UpdateSpec
from helpers import default_run_config

ROOT = Path(__file__).resolve().parents[1]
MODEL = UpdateSpec("head", ((3, 2), (2,)))  # two layers, any values

# Every Flower strategy with arguments that fit 7 replies in a round (Bulyan needs 4 f + 3).
CASES = {
    "FedAvg": {}, "FedAvgM": {"server_momentum": 0.9}, "FedProx": {"proximal_mu": 0.1}, "FedAdam": {"eta": 0.1},
    "FedYogi": {"eta": 0.1}, "FedAdagrad": {"eta": 0.1}, "FedMedian": {}, "FedTrimmedAvg": {"beta": 0.2},
    "Krum": {"num_malicious_nodes": 1}, "MultiKrum": {"num_malicious_nodes": 1, "num_nodes_to_select": 3},
    "Bulyan": {"num_malicious_nodes": 1}, "QFedAvg": {"client_learning_rate": 0.1},
    "DifferentialPrivacyServerSideFixedClipping": {"strategy": "FedAvg", "noise_multiplier": 0.5, "clipping_norm": 1.0},
    "DifferentialPrivacyServerSideAdaptiveClipping": {"strategy": "FedAvg", "noise_multiplier": 0.5, "clipped_count_stddev": 1.0},
    "DifferentialPrivacyClientSideFixedClipping": {"strategy": "FedAvg", "noise_multiplier": 0.5, "clipping_norm": 1.0},
    "DifferentialPrivacyClientSideAdaptiveClipping": {"strategy": "FedAvg", "noise_multiplier": 0.5, "clipped_count_stddev": 1.0},
}
ROUNDS = 3  # stateful strategies (server optimizers, momentum, adaptive clipping) must agree round after round


def _replies(rnd: int, n: int = 7, seed: int = 0) -> list[tuple[list[np.ndarray], dict]]:
    rng = np.random.default_rng([seed, rnd])
    return [([rng.normal(size=(3, 2)), rng.normal(size=2)],
             {"num-examples": int(rng.integers(5, 50)), "train_loss": float(rng.uniform(0.1, 2.0)), "norm_bit": int(rng.integers(2))})
            for _ in range(n)]


class _Members:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(self.n))


def _flower_message(params, metrics) -> Message:
    """A reply as a Flower ClientApp sends it: Flower's own ArrayRecord of a list of arrays."""
    return Message(RecordDict({"arrays": ArrayRecord(numpy_ndarrays=params), "metrics": MetricRecord(metrics)}), dst_node_id=1,
                   message_type="train")


def _by_flower(strategy, rnd: int, current: list[np.ndarray], replies, seed: bool = True) -> list[np.ndarray]:
    """One round of the Flower strategy called directly, as Flower's own loop calls it."""
    strategy.configure_train(rnd, ArrayRecord(numpy_ndarrays=current), ConfigRecord(), _Members(len(replies)))
    if seed:
        np.random.seed(rnd)  # DP noise comes from numpy's global generator
    arrays, _ = strategy.aggregate_train(rnd, [_flower_message(p, m) for p, m in replies])
    return arrays.to_numpy_ndarrays()


def _tiers(edge: str, cloud: str, edge_args: str = "", cloud_args: str = "") -> Tiers:
    return Tiers.of(config.validate(default_run_config(**{"edge-strategy": edge, "edge-strategy-args": edge_args,
                                                          "cloud-strategy": cloud, "cloud-strategy-args": cloud_args})))


def _toml(args: dict) -> str:
    return "{" + ", ".join(f"{k} = {v!r}".replace("'", '"') for k, v in args.items()) + "}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_flat_aggregation_equals_the_flower_strategy_called_directly(name):
    nodes = list(range(7))
    ours = _tiers("none", name, cloud_args=_toml(CASES[name])).aggregator({n: n % 2 for n in nodes}, 1)
    flower = strategies.build(name, CASES[name], replies=len(nodes))
    model_ours = model_flower = [np.zeros((3, 2)), np.zeros(2)]
    for rnd in range(1, ROUNDS + 1):
        replies = _replies(rnd)
        ours.configure("head", rnd, {}, model_ours)
        np.random.seed(rnd)
        model_ours = ours.aggregate(rnd, [NodeUpdate(n, p, m) for n, (p, m) in zip(nodes, replies)], MODEL).aggregate.global_params
        model_flower = _by_flower(flower, rnd, model_flower, replies)
        for a, b in zip(model_ours, model_flower):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("edge, cloud", sorted({*((name, "FedAvg") for name in CASES), *(("FedAvg", name) for name in CASES if name != "Bulyan"),
                                                 ("FedMedian", "FedAdam"), ("Krum", "FedAvgM"), ("FedTrimmedAvg", "FedYogi")}))
def test_hierarchical_aggregation_equals_the_strategy_per_cluster_then_across_clusters(edge, cloud):
    clusters = {n: 0 if n < 7 else 1 for n in range(14)}  # two clusters of seven
    ours = _tiers(edge, cloud, _toml(CASES[edge]), _toml(CASES[cloud])).aggregator(clusters, 1)
    by_hand_edge = {c: strategies.build(edge, CASES[edge], 7) for c in (0, 1)}
    by_hand_cloud = strategies.build(cloud, CASES[cloud], 2)
    global_ours = global_hand = [np.zeros((3, 2)), np.zeros(2)]
    for rnd in range(1, ROUNDS + 1):
        replies = {c: _replies(rnd, seed=c) for c in (0, 1)}
        ours.configure("head", rnd, {}, global_ours)
        updates = [NodeUpdate(7 * c + i, p, m) for c in (0, 1) for i, (p, m) in enumerate(replies[c])]
        np.random.seed(rnd)  # one DP noise stream per round, drawn edge 0, edge 1, cloud, in both computations
        result = ours.aggregate(rnd, updates, MODEL).aggregate
        np.random.seed(rnd)
        edge_models = {c: _by_flower(by_hand_edge[c], rnd, global_hand, replies[c], seed=False) for c in (0, 1)}
        weights = {c: sum(m["num-examples"] for _, m in replies[c]) for c in (0, 1)}
        # an edge's reply carries its clients' example-weighted metrics (train_loss for QFedAvg, norm_bit for adaptive DP)
        edge_metrics = {c: {"num-examples": weights[c], **{k: float(np.average([m[k] for _, m in replies[c]], weights=[m["num-examples"] for _, m in replies[c]]))
                                                           for k in ("train_loss", "norm_bit")}} for c in (0, 1)}
        global_hand = _by_flower(by_hand_cloud, rnd, global_hand, [(edge_models[c], edge_metrics[c]) for c in (0, 1)], seed=False)
        global_ours = result.global_params
        for c in (0, 1):
            for a, b in zip(result.cluster_params[c], edge_models[c]):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
        assert result.cluster_weights == {c: float(w) for c, w in weights.items()}
        for a, b in zip(global_ours, global_hand):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_each_model_has_its_own_optimizer_state_and_it_survives_a_checkpoint():
    clusters = {n: n % 2 for n in range(4)}
    aggregator = _tiers("FedAvg", "FedAdam", cloud_args="{eta = 0.1}").aggregator(clusters, 1)
    tau = UpdateSpec("threshold", ((1,),))
    for rnd in (1, 2):
        aggregator.configure("head", rnd, {}, [np.zeros((3, 2)), np.zeros(2)])
        aggregator.aggregate(rnd, [NodeUpdate(n, p, m) for n, (p, m) in zip(range(4), _replies(rnd, 4))], MODEL)
        aggregator.configure("threshold", rnd, {}, [np.array([0.5])])
        aggregator.aggregate(rnd, [NodeUpdate(n, [np.array([0.1 * n + 0.1 * rnd])], {"num-examples": 10}) for n in range(4)], tau)
    assert set(aggregator.cloud) == {"head", "threshold"} and set(aggregator.edge) == {(m, c) for m in ("head", "threshold") for c in (0, 1)}
    assert aggregator.cloud["head"].m_t["0"].shape == (3, 2) and aggregator.cloud["threshold"].m_t["0"].shape == (1,)

    resumed = _tiers("FedAvg", "FedAdam", cloud_args="{eta = 0.1}").aggregator(clusters, 1)
    resumed.load_state(pickle.loads(pickle.dumps(aggregator.state())))
    for agg in (aggregator, resumed):
        agg.configure("threshold", 3, {}, [np.array([0.4])])
    replies = [NodeUpdate(n, [np.array([0.3])], {"num-examples": 10}) for n in range(4)]
    assert resumed.aggregate(3, replies, tau).aggregate.global_params[0][0] == aggregator.aggregate(3, replies, tau).aggregate.global_params[0][0]


def test_fedprox_mu_reaches_the_clients_through_the_round_config():
    aggregator = _tiers("FedProx", "FedAvg", "{proximal_mu = 0.3}").aggregator({1: 0, 2: 1}, 1)
    asked = aggregator.configure("head", 1, {}, [np.zeros(2)])
    assert asked == {0: {"proximal-mu": 0.3}, 1: {"proximal-mu": 0.3}}
    asked = _tiers("FedAvg", "DifferentialPrivacyClientSideFixedClipping", cloud_args=_toml(CASES["DifferentialPrivacyClientSideFixedClipping"])
                   ).aggregator({1: 0, 2: 1}, 1).configure("head", 1, {}, [np.zeros(2)])
    assert asked[0]["clipping_norm"] == 1.0


def test_a_strategy_that_needs_more_clients_than_its_tier_has_fails_with_the_reason():
    aggregator = _tiers("FedAvg", "FedAvg", "{min_available_nodes = 3}").aggregator({1: 0, 2: 0, 3: 1}, 1)
    with pytest.raises(ValueError, match="needs 3 members, its tier has 2"):
        aggregator.configure("head", 1, {}, [np.zeros(2)])


def test_a_user_strategy_by_import_path():
    aggregator = _tiers("examples.median_of_means:MedianOfMeans", "FedAvg", "{groups = 2}").aggregator({n: 0 for n in range(4)}, 1)
    taus = [0.1, 0.2, 0.3, 0.9]
    aggregator.configure("threshold", 1, {}, [np.array([0.5])])
    result = aggregator.aggregate(1, [NodeUpdate(n, [np.array([t])], {"num-examples": 10}) for n, t in enumerate(taus)],
                                  UpdateSpec("threshold", ((1,),)))
    assert result.aggregate.global_params[0][0] == pytest.approx(np.median([np.mean(taus[:2]), np.mean(taus[2:])]))


@pytest.mark.parametrize("edge, cloud, args, message", [
    ("Kurm", "FedAvg", "", "'edge-strategy' = 'Kurm'"),
    ("FedAvg", "nowhere.module:Thing", "", "cannot import it"),
    ("FedAvg", "numpy:ndarray", "", "is not a subclass"),
    ("FedTrimmedAvg", "FedAvg", "{beta = }", "'edge-strategy-args'"),
    ("Krum", "FedAvg", "{num_malicious = 2}", "unexpected keyword argument 'num_malicious'"),
])
def test_bad_strategies_are_refused_at_start_naming_what_is_wrong(edge, cloud, args, message):
    with pytest.raises(config.ConfigError, match=message):
        _tiers(edge, cloud, args)


def test_every_preset_under_conf_strategies_builds_its_strategies():
    presets = sorted((ROOT / "conf" / "strategies").glob("*.toml"))
    named = set()
    for preset in presets:
        values = tomllib.loads(preset.read_text())
        assert set(values) <= set(config.key_names().values()), preset.name
        tiers = Tiers.of(config.validate(default_run_config(**values)))
        named |= set(tiers.names)
    assert set(strategies.FLOWER_STRATEGIES) <= named | {"none"}


def test_client_side_clipping_bounds_the_update_and_reports_the_norm_bit():
    from fedhlm_app.fl.round_config import RoundConfig

    start = [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)]
    trained = [np.full((2, 2), 3.0, np.float32), np.full(3, 4.0, np.float32)]  # update norm sqrt(4*9 + 3*16) = sqrt(84)
    metrics: dict = {}
    clipped = RoundConfig(clipping_norm=2.0).clipped(trained, start, metrics)
    norm = np.sqrt(sum(float(np.sum((c - s) ** 2)) for c, s in zip(clipped, start)))
    assert norm == pytest.approx(2.0, rel=1e-6) and metrics == {"norm_bit": 1} and clipped[0].dtype == np.float32
    np.testing.assert_allclose(clipped[0] / clipped[0].max(), 1.0)  # the direction is kept
    small: dict = {}
    assert RoundConfig(clipping_norm=100.0).clipped(trained, start, small)[1][0] == 4.0 and small == {"norm_bit": 0}
    assert RoundConfig().clipped(trained, start, {}) is trained
    unmoved: dict = {}  # a client whose training did not move the model (a threshold at its fixed point)
    assert RoundConfig(clipping_norm=1.0).clipped([s.copy() for s in start], start, unmoved)[0].sum() == 0 and unmoved == {"norm_bit": 0}
    assert RoundConfig.of(RoundConfig(0.5, 2.0).as_config()) == RoundConfig(0.5, 2.0)


def test_a_failing_strategy_leaves_the_model_as_it_was(caplog):
    """Flower's server-side DP clipping divides by each update's norm: an update that did not move
    (every client's threshold stayed where it was) makes it fail; the round keeps the model."""
    args = _toml(CASES["DifferentialPrivacyServerSideFixedClipping"])
    aggregator = _tiers("none", "DifferentialPrivacyServerSideFixedClipping", cloud_args=args).aggregator({1: 0, 2: 0}, 1)
    tau = UpdateSpec("threshold", ((1,),))
    aggregator.configure("threshold", 1, {}, [np.array([1.0])])
    with caplog.at_level("WARNING"):
        result = aggregator.aggregate(1, [NodeUpdate(n, [np.array([1.0])], {"num-examples": 10}) for n in (1, 2)], tau)
    assert result is None
    assert "DifferentialPrivacyServerSideFixedClipping' failed (ZeroDivisionError" in caplog.text


def test_a_server_optimizer_keeps_the_models_dtype():
    aggregator = _tiers("FedAvg", "FedAdam", cloud_args="{eta = 0.1}").aggregator({1: 0, 2: 1}, 1)
    for rnd in (1, 2):
        aggregator.configure("head", rnd, {}, [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)])
        replies = [NodeUpdate(n, [p.astype(np.float32) for p in params], m) for n, (params, m) in zip((1, 2), _replies(rnd, 2))]
        result = aggregator.aggregate(rnd, replies, MODEL).aggregate
        assert [a.dtype for a in result.global_params] == [np.float32, np.float32]  # Flower's FedAdam returns float64


@pytest.mark.parametrize("name", ["Bulyan", "QFedAvg"])
def test_strategies_that_collect_garbage_per_reply_do_not_walk_the_heap_and_leak_nothing(name):
    """Bulyan and QFedAvg call gc.collect() for every reply they decode, a walk of the whole heap each;
    the tiers skip those calls, and the garbage they would have freed is still collected afterwards."""
    import gc
    import weakref

    class Cycle:
        pass

    aggregator = _tiers("none", name, cloud_args=_toml(CASES[name])).aggregator({n: 0 for n in range(7)}, 1)
    full_collections = []

    def count(phase, info):
        if phase == "start" and info["generation"] == 2:
            full_collections.append(info)

    garbage = Cycle()
    garbage.itself = garbage  # unreachable once dropped: only a collection frees it
    alive = weakref.ref(garbage)
    del garbage
    gc.callbacks.append(count)
    try:
        for rnd in (1, 2):
            aggregator.configure("head", rnd, {}, [np.zeros((3, 2)), np.zeros(2)])
            result = aggregator.aggregate(rnd, [NodeUpdate(n, p, m) for n, (p, m) in enumerate(_replies(rnd))], MODEL)
            assert result is not None
    finally:
        gc.callbacks.remove(count)
    assert full_collections == []  # 14 replies decoded, no walk of the heap
    gc.collect()  # restored: a later collection frees what the skipped ones would have
    assert alive() is None

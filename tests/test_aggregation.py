import numpy as np
import pytest

from fedhlm_app import config
from fedhlm_app.fl.aggregation import ServerAdam, Update, flat, hierarchical, weighted_mean
from fedhlm_app.fl.strategy import STRATEGIES, NodeUpdate, make_aggregator
from fedhlm_app.fl.updates import UpdateSpec
from helpers import default_run_config

ANY_TAU = UpdateSpec("threshold", ((1,),))  # one number, any value


def _updates():
    # cluster 0: taus 0.2 (n=10), 0.4 (n=30); cluster 1: 0.8 (n=60)
    return [
        Update([np.array([0.2])], 0, 10.0),
        Update([np.array([0.4])], 0, 30.0),
        Update([np.array([0.8])], 1, 60.0),
    ]


def test_hierarchical_weights_match_hand_computation():
    agg = hierarchical(_updates())
    tau_c0 = (10 * 0.2 + 30 * 0.4) / 40  # 0.35
    tau_c1 = 0.8
    assert agg.cluster_params[0][0][0] == pytest.approx(tau_c0)
    assert agg.cluster_params[1][0][0] == pytest.approx(tau_c1)
    assert agg.cluster_weights == {0: 40.0, 1: 60.0}
    assert agg.global_params[0][0] == pytest.approx((40 * tau_c0 + 60 * tau_c1) / 100)


def test_flat_weighted_mean_equals_hierarchical_global():
    assert flat(_updates()).global_params[0][0] == pytest.approx(hierarchical(_updates()).global_params[0][0])


def test_weighted_mean_of_multi_layer_params():
    out = weighted_mean([[np.ones((2, 2)), np.zeros(3)], [np.zeros((2, 2)), np.ones(3)]], [1, 3])
    assert np.allclose(out[0], 0.25) and np.allclose(out[1], 0.75)
    with pytest.raises(ValueError):
        weighted_mean([], [])


def _reply(node: int, tau: float, n: int) -> NodeUpdate:
    return NodeUpdate(node, [np.array([tau])], {"num-examples": n, "loss": tau})


def make_strategy(overrides: dict, cluster_of: dict[int, int]):
    return make_aggregator(config.validate(default_run_config(**overrides)), cluster_of)


def test_strategy_groups_replies_by_cluster():
    strategy = make_strategy({"strategy": "hierarchical-fedavg"}, {1: 0, 2: 0, 3: 1})
    result = strategy.aggregate(1, [_reply(1, 0.2, 10), _reply(2, 0.4, 30), _reply(3, 0.8, 60)], ANY_TAU)
    assert result.aggregate.global_params[0][0] == pytest.approx(0.35 * 0.4 + 0.8 * 0.6)
    assert result.aggregate.cluster_params[0][0][0] == pytest.approx(0.35)
    assert result.metrics["num-examples"] == 100 and result.metrics["loss"] == pytest.approx(0.62)


def test_config_accepts_exactly_the_registered_strategies():
    for name in STRATEGIES:
        assert config.validate(default_run_config(strategy=name)).strategy == name
    with pytest.raises(config.ConfigError, match="strategy"):
        config.validate(default_run_config(strategy="krum"))


# cluster 0: five clients, one of them an outlier (tau 0.99); cluster 1: two clients
ROBUST_REPLIES = [(1, 0.2, 10), (2, 0.3, 20), (3, 0.4, 30), (4, 0.5, 10), (5, 0.99, 30), (6, 0.6, 40), (7, 0.8, 60)]
ROBUST_CLUSTERS = {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 1, 7: 1}


@pytest.mark.parametrize(
    "name, cluster0, cluster1",
    [
        ("hierarchical-fedavg", (2 + 6 + 12 + 5 + 29.7) / 100, (24 + 48) / 100),
        ("hierarchical-median", 0.4, (0.6 + 0.8) / 2),  # unweighted median per cluster
        ("hierarchical-trimmed-mean", (0.3 + 0.4 + 0.5) / 3, (0.6 + 0.8) / 2),  # 20% of 5 = 1 cut at each end
    ],
)
def test_every_hierarchical_strategy_matches_a_hand_computation(name, cluster0, cluster1):
    strategy = make_strategy({"strategy": name, "trim-fraction": 0.2}, ROBUST_CLUSTERS)
    result = strategy.aggregate(1, [_reply(*r) for r in ROBUST_REPLIES], ANY_TAU).aggregate
    assert result.cluster_params[0][0][0] == pytest.approx(cluster0)
    assert result.cluster_params[1][0][0] == pytest.approx(cluster1)
    # the cloud weighs each cluster by its clients' samples: 100 and 100
    assert result.global_params[0][0] == pytest.approx((100 * cluster0 + 100 * cluster1) / 200)


def test_robust_edges_resist_an_outlier_that_moves_the_mean():
    replies = [_reply(*r) for r in ROBUST_REPLIES]
    tau = {name: make_strategy({"strategy": name, "trim-fraction": 0.2}, ROBUST_CLUSTERS).aggregate(1, replies, ANY_TAU)
           .aggregate.global_params[0][0] for name in ("hierarchical-fedavg", "hierarchical-median", "hierarchical-trimmed-mean")}
    assert tau["hierarchical-median"] < tau["hierarchical-fedavg"] and tau["hierarchical-trimmed-mean"] < tau["hierarchical-fedavg"]


def test_flat_fedavg_preset_matches_a_hand_computation():
    strategy = make_strategy({"strategy": "fedavg"}, ROBUST_CLUSTERS)
    result = strategy.aggregate(1, [_reply(*r) for r in ROBUST_REPLIES], ANY_TAU)
    expected = sum(t * n for _, t, n in ROBUST_REPLIES) / sum(n for _, _, n in ROBUST_REPLIES)
    assert result.aggregate.global_params[0][0] == pytest.approx(expected)


def test_every_preset_under_conf_strategies_names_a_known_strategy():
    import tomllib
    from pathlib import Path

    presets = sorted((Path(__file__).resolve().parents[1] / "conf" / "strategies").glob("*.toml"))
    assert {p.stem for p in presets} == set(STRATEGIES)
    for preset in presets:
        values = tomllib.loads(preset.read_text())
        assert values["strategy"] == preset.stem
        assert set(values) <= set(config.key_names().values())


def test_server_adam_follows_the_edge_mean_with_adam_steps():
    adam = ServerAdam(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-9)
    # round 1 starts the model at the target (weighted mean of the edge results)
    assert adam([[np.array([0.2])], [np.array([0.6])]], [1, 1])[0][0] == pytest.approx(0.4)
    # round 2: target 0.5, d = 0.1, m = 0.01, v = 1e-4, step = 0.1 * 0.01 / 0.01 = 0.1
    assert adam([[np.array([0.5])]], [1])[0][0] == pytest.approx(0.5)
    # round 3: target 0.5, d = 0, m = 0.009, v = 0.99e-4, step = 0.1 * 0.009 / sqrt(0.99e-4)
    assert adam([[np.array([0.5])]], [1])[0][0] == pytest.approx(0.5 + 0.1 * 0.009 / np.sqrt(0.99e-4))
    # another model (other shapes: the head after the thresholds) keeps its own state
    head = adam([[np.ones((2, 3)), np.zeros(3)]], [1])
    assert np.allclose(head[0], 1.0) and len(adam.state) == 2


def test_fedadam_strategy_moves_the_cloud_model_and_keeps_weighted_edges():
    strategy = make_strategy({"strategy": "hierarchical-fedadam", "server-lr": 0.1}, ROBUST_CLUSTERS)
    replies = [_reply(*r) for r in ROBUST_REPLIES]
    first = strategy.aggregate(1, replies, ANY_TAU).aggregate.global_params[0][0]
    assert first == pytest.approx((0.547 + 0.72) / 2)  # round 1: the weighted mean of the edges
    shifted = [_reply(node, tau + 0.1, n) for node, tau, n in ROBUST_REPLIES]
    second = strategy.aggregate(2, shifted, ANY_TAU).aggregate
    assert second.global_params[0][0] == pytest.approx(first + 0.1)  # first Adam step: lr in the direction of the shift
    assert second.cluster_params[0][0][0] == pytest.approx(0.647)  # edges are plain weighted means


def test_an_edge_round_stops_before_the_cloud():
    strategy = make_strategy({"strategy": "hierarchical-fedadam", "server-lr": 0.1}, ROBUST_CLUSTERS)
    result = strategy.aggregate(1, [_reply(*r) for r in ROBUST_REPLIES], ANY_TAU, cloud=False)
    assert not result.is_cloud_round and result.metrics["num-examples"] == 200
    assert result.aggregate.cluster_params[0][0][0] == pytest.approx(0.547) and result.aggregate.cluster_params[1][0][0] == pytest.approx(0.72)
    assert strategy.cloud_rule.state == {}  # the cloud optimizer did not step
    flat_strategy = make_strategy({"strategy": "fedavg"}, ROBUST_CLUSTERS)
    assert flat_strategy.aggregate(1, [_reply(*r) for r in ROBUST_REPLIES], ANY_TAU, cloud=False).is_cloud_round  # no edge tier


def test_cloud_rounds_are_every_kth_and_the_last():
    from fedhlm_app.app.phases import is_cloud_round

    assert [r for r in range(1, 8) if is_cloud_round(r, 7, 3)] == [3, 6, 7]
    assert all(is_cloud_round(r, 5, 1) for r in range(1, 6))

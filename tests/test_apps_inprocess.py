"""The real ClientApp and ServerApp, driven in-process through a Ray-free Grid."""

import json
import math
import tomllib

import numpy as np
import pytest

from client_app import app as client_app
from helpers import ROOT, LocalGrid, default_run_config, server_context
from server_app import app as server_app

REQUIRED_KEYS = {
    "accuracy", "llm_rate", "llm_reduction", "local_rate", "baselines", "thresholds", "clients", "clusters",
    "communication", "wall_time_s", "config", "training",
}


def _run(tmp_path, tiny_bert, nodes, **overrides):
    rc = default_run_config(
        **{
            "slm-model": str(tiny_bert), "data-source": "local", "data-dir": str(tmp_path.parent.parent / "unused"),
            "cache-dir": str(tmp_path / "cache"), "results-dir": str(tmp_path / "results"), **overrides,
        }
    )
    from fedhlm_app.paths import BUNDLED_DATA

    rc["data-dir"] = str(BUNDLED_DATA)
    grid = LocalGrid(client_app, nodes, rc)
    server_app(grid, server_context(rc))
    return grid, json.loads((tmp_path / "results" / "latest" / "results.json").read_text())


@pytest.fixture(scope="module")
def four_clients_two_clusters(tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("inproc")
    nodes = [{"partition-id": i, "num-partitions": 4, "cluster-id": i // 2} for i in range(4)]
    # P2P on with a loose bound and free peer attempts and errors, so that peers answer and every P2P path runs
    return tmp, _run(tmp, tiny_bert, nodes, **{"threshold-rounds": 4, "tau-init": 0.95, "p2p": True, "p2p-max-error": 0.95,
                                             "p2p-cost": 0.0, "p2p-error-cost": 0.0,
                                             "p2p-beat-threshold": False})


def test_full_pipeline_writes_every_result(four_clients_two_clusters):
    tmp, (grid, results) = four_clients_two_clusters
    assert REQUIRED_KEYS <= set(results)
    assert set(results["baselines"]) == {"slm_only", "cloud_only", "static_threshold"}
    assert results["baselines"]["cloud_only"]["llm_rate"] == 1.0
    assert results["baselines"]["cloud_only"]["accuracy"] == 1.0  # the labels oracle is ground truth
    assert results["baselines"]["slm_only"]["llm_rate"] == 0.0
    assert results["llm_reduction"] == pytest.approx(1 - results["llm_rate"])
    use = results["llm_use"]  # training counted too
    assert use["total_items"] == use["training_items"] + use["inference_items"] and use["training_items"] == results["training"]["llm_items"]
    assert use["cloud_only_items"] == results["num_test_items"]
    assert results["llm_reduction_total"] == pytest.approx(1 - use["total_items"] / use["cloud_only_items"])
    assert results["llm_reduction_total"] < results["llm_reduction"]
    assert results["num_test_items"] == 200
    assert (tmp / "results" / "smoke" / "thresholds.png").stat().st_size > 1000
    assert "FedHLM" in (tmp / "results" / "smoke" / "summary.md").read_text()


def test_clusters_come_from_node_config_and_thresholds_per_round(four_clients_two_clusters):
    _, (_, results) = four_clients_two_clusters
    assert sorted(results["clusters"]) == ["0", "1"]
    assert [c["cluster"] for c in results["clients"]] == [0, 0, 1, 1]
    assert len(results["thresholds"]["global"]) == 4
    assert set(results["thresholds"]["clusters"]) == {"0", "1"}
    for r in results["thresholds"]["rounds"]:
        # the cloud threshold is the sample-weighted mean of the edge thresholds
        weights = {c: sum(x["num_calibration"] for x in results["clients"] if str(x["cluster"]) == c) for c in r["tau_clusters"]}
        expected = sum(weights[c] * t for c, t in r["tau_clusters"].items()) / sum(weights.values())
        assert r["tau_global"] == pytest.approx(expected)


def test_phases_and_ledger(four_clients_two_clusters):
    _, (grid, results) = four_clients_two_clusters
    assert grid.sent.count("query.setup") == 4
    assert grid.sent.count("train.threshold") == 16
    ledger = results["communication"]["by_phase_and_link"]
    assert ledger["threshold"]["client->llm"]["items"] == results["training"]["llm_items"] > 0
    assert ledger["threshold"]["edge->cloud"]["messages"] == 2 * 4  # one per cluster and round
    assert ledger["inference:cloud_only"]["client->llm"]["items"] == 200
    assert "client->llm" not in ledger["inference:slm_only"]
    assert results["communication"]["inference_llm_bytes"]["cloud_only"] >= results["communication"]["inference_llm_bytes"]["fedhlm"]
    fedhlm_items = ledger["inference:fedhlm"].get("client->llm", {"items": 0})["items"]
    assert fedhlm_items == round(results["llm_rate"] * results["num_test_items"])


def test_client_state_keeps_threshold_feedback_and_head_outputs(four_clients_two_clusters):
    _, (grid, results) = four_clients_two_clusters
    state = grid.state(1000)
    assert {"head-outputs", "threshold", "feedback"} <= set(state.keys())
    queries = next(c["num_test"] for c in results["clients"] if c["node_id"] == 1000)
    assert state["head-outputs"]["test"].numpy().shape == (queries, 4)  # probabilities, not the head's weights
    ids = state["feedback"]["ids"].numpy()
    assert len(ids) == len(np.unique(ids))  # each item is sent to the LLM at most once in training


def test_clients_reweight_the_global_head_to_their_own_label_mix(four_clients_two_clusters):
    from fedhlm_app.app.node import Node
    from fedhlm_app.reporting.results import SavedModel
    from fedhlm_app.slm.head import head_from_config
    from fedhlm_app.slm.label_prior import calibrated, causal_priors, prior_of

    tmp, (grid, results) = four_clients_two_clusters
    contexts = [grid.context(node) for node in grid.get_node_ids()]
    nodes = [Node.of(ctx) for ctx in contexts]
    cfg = nodes[0].cfg
    assert cfg.local_label_prior
    own = [node.texts.own_label_counts() for node in nodes]
    pooled = prior_of(np.sum(own, axis=0))
    model = SavedModel.load(tmp / "results" / "latest" / "model.npz")
    np.testing.assert_array_equal(model.label_counts, np.sum(own, axis=0))  # saved for the harness
    for ctx, node, counts in zip(contexts, nodes, own):
        data = node.data
        head = head_from_config(cfg, data.dim, data.num_classes).set_params(model.head)
        own = prior_of(counts)
        calibration = head.predict_proba(data.calibration.inputs)
        # thresholds are learned on the global head's probabilities of the labelled rows
        np.testing.assert_allclose(ctx.state["head-outputs"]["calibration"].numpy(), calibration, atol=1e-6)
        queries = head.predict_proba(data.test.inputs)
        priors = causal_priors(calibrated(queries, calibration, data.calibration.y, own, pooled), own, pooled)
        expected = queries * priors / pooled
        np.testing.assert_allclose(ctx.state["head-outputs"]["test"].numpy(), expected / expected.sum(axis=1, keepdims=True), atol=1e-6)
        # P2P's held-out evidence routes the calibration items as queries are routed
        priors = causal_priors(calibrated(calibration, calibration, data.calibration.y, own, pooled), own, pooled)
        expected = calibration * priors / pooled
        np.testing.assert_allclose(ctx.state["head-outputs"]["calibration-as-queries"].numpy(), expected / expected.sum(axis=1, keepdims=True),
                                   atol=1e-6)
        row = next(c for c in results["clients"] if c["node_id"] == ctx.node_id)
        assert row["adapted_queries"] == pytest.approx(np.mean(np.any(priors != pooled, axis=1)))


def test_flat_fedavg_is_one_config_line(tmp_path, tiny_bert):
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    _, results = _run(tmp_path, tiny_bert, nodes, **{"edge-strategy": "none", "num-clients": 3, "num-clusters": 3, "threshold-rounds": 2})
    assert results["config"]["edge-strategy"] == "none"
    assert sorted(results["clusters"]) == ["0", "1", "2"]  # simulation rule: partition-id blocks
    assert "edge->cloud" not in results["communication"]["by_phase_and_link"]["threshold"]


def test_p2p_prototype_traffic_is_counted_and_tiers_add_up(four_clients_two_clusters):
    from flwr.app import RecordDict

    from fedhlm_app.app.protocol import pack_prototypes, serialized_size
    from fedhlm_app.routing.p2p import Prototypes

    _, (grid, results) = four_clients_two_clusters
    ledger = results["communication"]["by_phase_and_link"]["p2p"]
    # up: each client's fit-item class sums once (they never change), then its held-out evidence once
    assert ledger["client->edge"]["messages"] == 4 + 4
    # down: the prototypes once per client (the next threshold round), the evidence request, and
    # the certified thresholds with the FedHLM policy's routing instruction
    proto_size = serialized_size(RecordDict({"prototypes": pack_prototypes(Prototypes(np.zeros((4, 32)), [np.zeros((4, 32))]))}))
    assert ledger["edge->client"]["messages"] == 4 + 4 + 4
    assert ledger["edge->client"]["bytes"] > 4 * proto_size
    communication = results["communication"]
    assert communication["p2p_bytes"] == sum(v["bytes"] for v in ledger.values())
    # FedHLM with peers is charged the P2P traffic in its break-even; without peers it is not
    ours, without = communication["policies"]["fedhlm"], communication["policies"]["fedhlm_no_p2p"]
    assert ours["training_bytes"] - without["training_bytes"] == communication["p2p_bytes"]
    cloud_per_query = communication["policies"]["cloud_only"]["bytes_per_query"]
    assert ours["break_even_queries"] == math.ceil(ours["training_bytes"] / (cloud_per_query - ours["bytes_per_query"]))
    tiers = results["tiers"]
    assert sum(tiers.values()) == pytest.approx(1.0)
    assert results["p2p_rate"] > 0 and results["p2p_rate"] == pytest.approx(tiers["p2p-own-cluster"] + tiers["p2p-neighbour"])
    assert results["llm_rate"] == pytest.approx(tiers["llm"])
    side = results["p2p"]["with_vs_without"]
    assert side["without_p2p"]["llm_rate"] > side["with_p2p"]["llm_rate"]
    assert all(c["tried"] for c in results["p2p"]["per_cluster"].values())


def test_p2p_error_is_estimated_on_items_that_did_not_build_the_prototypes(four_clients_two_clusters):
    """The prototypes are the means of the cluster's fit items; the evidence counts exactly the
    calibration items above the learned threshold whose LLM verdict the client holds."""
    from fedhlm_app.app.node import NodeState
    from fedhlm_app.config import run_config_of
    from fedhlm_app.routing.router import Routing
    from fedhlm_app.slm.local_data import Placement, local_data
    from fedhlm_app.slm.predict import CALIBRATION_AS_QUERIES

    _, (grid, results) = four_clients_two_clusters
    cfg = run_config_of(grid.context(grid.get_node_ids()[0]).run_config)
    tau = results["final_threshold"]
    fit_x, fit_y, held_out = {0: [], 1: []}, {0: [], 1: []}, {0: 0, 1: 0}
    for node in grid.get_node_ids():
        context = grid.context(node)
        placement = Placement.of(context.node_config, cfg)
        data, state = local_data(cfg, placement, ""), NodeState(context.state)
        fit_x[placement.cluster_id].append(data.fit.x)
        fit_y[placement.cluster_id].append(data.fit.y)
        uncertainty = Routing.of(state.head_outputs.probs[CALIBRATION_AS_QUERIES], cfg.uncertainty).uncertainty
        held_out[placement.cluster_id] += int(np.sum(uncertainty[state.feedback.ids] > tau))
        own = state.prototypes.own
        x, y = np.concatenate(fit_x[placement.cluster_id]), np.concatenate(fit_y[placement.cluster_id])
        if len(fit_x[placement.cluster_id]) == 2:  # both clients of the cluster seen: the cluster's fit items
            expected = np.stack([x[y == k].mean(axis=0) if np.any(y == k) else np.zeros(x.shape[1]) for k in range(own.shape[0])])
            assert np.allclose(own, expected, atol=2e-3)
    for cluster, row in results["p2p"]["per_cluster"].items():
        assert row["held_out_items"] == held_out[int(cluster)] > 0


def test_p2p_replay_of_the_evaluation_harness_reproduces_the_run(four_clients_two_clusters):
    """The P2P study replays bounds from a run's model and checkpoint; at the run's own bound, with
    peers answering, it must give the run's accuracy, LLM rate and peer answers."""
    from fedhlm_app.config import run_config_of
    from fedhlm_app.tools.p2p_study import replay

    tmp, (grid, results) = four_clients_two_clusters
    cfg = run_config_of(grid.context(grid.get_node_ids()[0]).run_config)
    replayed = replay(cfg, tmp / "results" / "smoke", results["final_threshold"], (cfg.p2p_max_error, 0.05))
    ran = replayed[cfg.p2p_max_error]
    assert ran["accuracy"] == pytest.approx(results["accuracy"]) and ran["llm_rate"] == pytest.approx(results["llm_rate"])
    assert ran["peer_answers"] == results["p2p"]["hits"] > 0 and ran["peer_wrong"] == results["p2p"]["false_reuse"]
    assert replayed[0.05]["peer_answers"] < ran["peer_answers"]


def test_p2p_switch_off_removes_peer_traffic(tmp_path, tiny_bert):
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    _, results = _run(tmp_path, tiny_bert, nodes, **{"p2p": False, "num-clients": 2, "num-clusters": 1, "threshold-rounds": 2})
    assert results["p2p"] == {"enabled": False}
    assert "p2p" not in results["communication"]["by_phase_and_link"]
    assert results["p2p_rate"] == 0.0


def test_a_run_whose_oracle_is_down_finishes_and_says_so(tmp_path, tiny_bert):
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    from fedhlm_app.tools.launch import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(RuntimeError, match=r"the oracle \(remote\) never answered"):  # the run fails, after its report
        _run(tmp_path, tiny_bert, nodes, **{"oracle": "remote", "oracle-url": dead, "oracle-retries": 1, "oracle-batch-size": 8,
                                            "oracle-max-failures": 2, "num-clients": 2, "num-clusters": 1, "threshold-rounds": 2})
    results = json.loads((tmp_path / "results" / "latest" / "results.json").read_text())
    oracle = results["oracle"]
    assert oracle["backend"] == "remote" and oracle["items_asked"] > 0
    assert oracle["oracle_failures"] == oracle["items_asked"] and oracle["failure_rate"] == 1.0
    # two refused requests per phase, then the circuit breaker answers the phase's other chunks at once
    assert all("Connection refused" in f["cause"] and "not called: its last 2 requests failed" in f["cause"] for f in oracle["failed_batches"]
               if f["items"] > 16)
    # every escalated item kept its draft: every policy scores exactly what the SLM does
    for name in ("slm_only", "cloud_only", "static_threshold"):
        assert results["baselines"][name]["accuracy"] == pytest.approx(results["baselines"]["slm_only"]["accuracy"])
    assert results["baselines"]["cloud_only"]["oracle_failed_items"] == results["num_test_items"]
    assert "WARNING: the oracle never answered" in (tmp_path / "results" / "latest" / "summary.md").read_text()


def test_a_run_through_the_oracle_service_books_its_http_bytes(tmp_path, tiny_bert):
    from fedhlm_app.data.datasets import load_local
    from fedhlm_app.oracle.base import LabelsOracle
    from fedhlm_app.oracle.service import OracleService
    from fedhlm_app.paths import BUNDLED_DATA

    dataset = load_local(BUNDLED_DATA, "train.csv", "test.csv")
    with OracleService(LabelsOracle(dataset, 0), "labels", dataset.class_names, token="t0ken") as service:
        nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
        _, results = _run(tmp_path, tiny_bert, nodes, **{"oracle": "remote", "oracle-url": service.url, "oracle-api-key": "t0ken",
                                                        "num-clients": 2, "num-clusters": 1, "threshold-rounds": 2})
    assert results["oracle"]["oracle_failures"] == 0
    assert results["baselines"]["cloud_only"]["accuracy"] == 1.0  # the service's labels backend is ground truth
    ledger = results["communication"]["by_phase_and_link"]
    for phase in ("threshold", "inference:cloud_only"):
        assert ledger[phase]["cloud->oracle"]["bytes"] > ledger[phase]["client->llm"]["items"] * 20
        assert ledger[phase]["oracle->cloud"]["bytes"] > 0
        assert ledger[phase]["cloud->oracle"]["items"] == ledger[phase]["client->llm"]["items"]
    assert results["config"]["oracle-api-key"] == "(redacted)"


PRESETS = sorted(p.stem for p in (ROOT / "conf" / "strategies").glob("*.toml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_strategy_preset_runs_the_whole_app(tmp_path, tiny_bert, preset):
    values = tomllib.loads((ROOT / "conf" / "strategies" / f"{preset}.toml").read_text())
    # two clusters of five, as in the paper setting (the Krum family's presets assume five)
    nodes = [{"partition-id": i, "num-partitions": 10, "cluster-id": i // 5} for i in range(10)]
    _, results = _run(tmp_path, tiny_bert, nodes, **{**values, "num-clients": 10, "num-clusters": 2, "head-rounds": 2,
                                                     "threshold-rounds": 2})
    assert (results["config"]["edge-strategy"], results["config"]["cloud-strategy"]) == (values["edge-strategy"], values["cloud-strategy"])
    assert results["failures"] == [], results["failures"][:3]  # no client handler failed under the strategy's round config
    rounds = results["thresholds"]["rounds"]
    assert len(rounds) == 2 and all(0.0 <= r["tau_global"] <= 1.0 for r in rounds)
    if values["cloud-strategy"] == "FedAvg" and values["edge-strategy"] != "none":
        for r in rounds:  # the cloud step is a sample-weighted mean of the edge results
            weights = {c: sum(x["num_calibration"] for x in results["clients"] if str(x["cluster"]) == c) for c in r["tau_clusters"]}
            expected = sum(weights[c] * t for c, t in r["tau_clusters"].items()) / sum(weights.values())
            assert r["tau_global"] == pytest.approx(expected)


def test_fedprox_mu_reaches_the_clients_and_their_training_applies_it(tmp_path, tiny_bert):
    """With a large proximal mu the clients' heads stay near the global one: their training loss
    falls far less than under FedAvg from the same start (same seed, same data)."""
    nodes = [{"partition-id": i, "num-partitions": 4, "cluster-id": i // 2} for i in range(4)]
    losses = {}
    for name, values in {"fedavg": {}, "fedprox": {"edge-strategy": "FedProx", "edge-strategy-args": "{proximal_mu = 1000.0}"}}.items():
        _, results = _run(tmp_path / name, tiny_bert, nodes, **{**values, "head-rounds": 2, "threshold-rounds": 1})
        losses[name] = [h["train-loss"] for h in results["head_rounds"]]
    assert losses["fedprox"] != losses["fedavg"]
    assert losses["fedprox"][-1] > losses["fedavg"][-1]


def test_k_edge_rounds_per_cloud_round(tmp_path, tiny_bert):
    nodes = [{"partition-id": i, "num-partitions": 4, "cluster-id": i // 2} for i in range(4)]
    _, results = _run(tmp_path, tiny_bert, nodes, **{"cloud-every": 2, "head-rounds": 3, "threshold-rounds": 3, "tau-init": 0.95})
    rounds = results["thresholds"]["rounds"]
    assert [r["cloud"] for r in rounds] == [False, True, True]  # every 2nd round, and always the last
    assert rounds[0]["tau_global"] == 0.95  # an edge round leaves the global threshold alone
    assert rounds[0]["tau_clusters"]["0"] != rounds[0]["tau_clusters"]["1"]
    assert [h["cloud"] for h in results["head_rounds"]] == [False, True, True]
    ledger = results["communication"]["by_phase_and_link"]
    assert ledger["threshold"]["edge->cloud"]["messages"] == 2 * 2  # two clusters, two cloud rounds
    assert ledger["head"]["edge->cloud"]["messages"] == 2 * 2


def test_encoder_fine_tuning_rounds_then_the_head_reads_the_tuned_encoder(tmp_path, tiny_bert):
    nodes = [{"partition-id": i, "num-partitions": 4, "cluster-id": i // 2} for i in range(4)]
    grid, results = _run(tmp_path, tiny_bert, nodes, **{
        "encoder-rounds": 2, "encoder-layers": 1, "encoder-steps": 2, "encoder-batch-size": 8,
        "ngram-buckets": 1024, "threshold-rounds": 2})
    assert grid.sent.count("train.encoder") == 8 and grid.sent.count("query.install_encoder") == 4
    assert [r["round"] for r in results["encoder_rounds"]] == [1, 2]
    ledger = results["communication"]["by_phase_and_link"]["encoder"]
    assert ledger["edge->cloud"]["messages"] == 2 * 2  # two clusters, two rounds
    model = np.load(tmp_path / "results" / "latest" / "model.npz")
    tuned = [model[k] for k in sorted(model.files) if k.startswith("encoder_")]
    assert tuned and model["head_2"].shape == (1024, 4)  # the n-gram weights ride along with the head
    # every node featurized with the same installed checkpoint, named by the tuned weights
    paths = {str(grid.state(n)["encoder"]["path"]) for n in grid.get_node_ids()}
    assert len(paths) == 1 and paths.pop().startswith(str(tmp_path / "cache" / "models" / "tuned-"))
    assert 0.0 <= results["accuracy"] <= 1.0


def test_thresholds_that_cannot_move_are_reported(tmp_path, tiny_bert, caplog):
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    # A step size so small that no step can move tau past the warning's 1e-9 (every step is at most
    # lr * kappa / 4 = 1e-12), whatever the (randomly initialised) tiny BERT's uncertainties are.
    with caplog.at_level("WARNING"):
        _, results = _run(tmp_path, tiny_bert, nodes, **{"threshold-lr": 1e-13, "num-clients": 2, "num-clusters": 1,
                                                         "threshold-rounds": 3})
    assert results["thresholds"]["global"] == pytest.approx([0.9] * 3)
    assert "no threshold has moved from tau-init = 0.9: the loss gradient vanishes (kappa = 20.0" in caplog.text
    assert "threshold-lr = 1e-13 is too small" in caplog.text


def test_permuting_the_test_labels_after_partitioning_changes_no_probability_escalation_or_threshold(tmp_path, tiny_bert, monkeypatch):
    """No test label reaches the model, the routing or the thresholds: only the scores may change."""
    import dataclasses

    import fedhlm_app.slm.local_data as local_data
    from fedhlm_app.data.datasets import Split

    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    overrides = {"num-clients": 3, "num-clusters": 1, "threshold-rounds": 3, "p2p": True, "cache-dir": str(tmp_path / "cache")}
    grid, results = _run(tmp_path / "a", tiny_bert, nodes, **overrides)  # partitions computed and cached here
    original = local_data._dataset

    def permuted(key):
        ds = original(key)
        labels = np.random.default_rng(0).permutation(ds.test.labels)
        return dataclasses.replace(ds, test=Split(ds.test.texts, labels))

    monkeypatch.setattr(local_data, "_dataset", permuted)  # the cached partitions keep the original streams
    local_data.local_texts.cache_clear()
    local_data.local_data.cache_clear()
    try:
        grid_p, results_p = _run(tmp_path / "b", tiny_bert, nodes, **overrides)
    finally:
        local_data.local_texts.cache_clear()
        local_data.local_data.cache_clear()
    assert results_p["baselines"]["slm_only"]["accuracy"] != results["baselines"]["slm_only"]["accuracy"]  # the labels did change
    # equal up to floating-point noise (the order sums happen to run in; below 1e-7), which no label decides
    assert results_p["thresholds"]["global"] == pytest.approx(results["thresholds"]["global"], rel=1e-12)
    for node in grid.get_node_ids():
        np.testing.assert_allclose(grid_p.state(node)["head-outputs"]["test"].numpy(), grid.state(node)["head-outputs"]["test"].numpy(),
                                   rtol=0, atol=1e-7)
    for a, b in zip(results["clients"], results_p["clients"]):
        assert a["tau"] == pytest.approx(b["tau"], rel=1e-12) and (a["llm_rate"], a["num_test"]) == (b["llm_rate"], b["num_test"])
    for policy in ("fedhlm", "static_threshold"):
        ledger, ledger_p = (r["communication"]["by_phase_and_link"][f"inference:{policy}"] for r in (results, results_p))
        assert ledger.get("client->llm") == ledger_p.get("client->llm")


class _RecordingGrid(LocalGrid):
    """Keeps the serialized size of every head message and of its reply, as they cross."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_bytes = {"edge->client": 0, "client->edge": 0}

    def push_messages(self, messages):
        from fedhlm_app.app.protocol import serialized_size

        ids = super().push_messages(messages)
        for m, i in zip(messages, ids):
            if m.metadata.message_type in ("train.head", "query.install_head"):
                self.head_bytes["edge->client"] += serialized_size(m.content)
                self.head_bytes["client->edge"] += serialized_size(self._replies[i].content)
        return ids


@pytest.mark.parametrize("compression", ["none", "int4"])
def test_the_ledger_books_head_traffic_at_its_serialized_size(tmp_path, tiny_bert, compression):
    from fedhlm_app.paths import BUNDLED_DATA

    rc = default_run_config(**{"slm-model": str(tiny_bert), "data-source": "local", "data-dir": str(BUNDLED_DATA),
                               "cache-dir": str(tmp_path / "cache"), "results-dir": str(tmp_path / "results"),
                               "compression": compression, "ngram-buckets": 8192, "threshold-rounds": 1})
    nodes = [{"partition-id": i, "num-partitions": 4, "cluster-id": i // 2} for i in range(4)]
    grid = _RecordingGrid(client_app, nodes, rc)
    server_app(grid, server_context(rc))
    results = json.loads((tmp_path / "results" / "latest" / "results.json").read_text())
    head = results["communication"]["by_phase_and_link"]["head"]
    assert {link: head[link]["bytes"] for link in grid.head_bytes} == grid.head_bytes
    full_model = (32 * 4 + 4 + 8192 * 4) * 4  # float32 weights on the tiny BERT's 32-wide embedding, bias, n-gram table
    per_message = head["edge->client"]["bytes"] / head["edge->client"]["messages"]
    if compression == "none":
        assert per_message > full_model  # the whole model, every time
    else:
        assert per_message < full_model / 8  # deltas of changed rows in 4 bits
        assert head["edge->cloud"]["bytes"] < head["edge->cloud"]["messages"] * full_model / 8

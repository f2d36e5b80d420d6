"""A tiny version of the evaluation harness, end to end (real apps, tiny BERT, two seeds)."""

import json

from fedhlm_app.paths import BUNDLED_DATA
from fedhlm_app.reporting import frontier as frontier_mod
from fedhlm_app.tools import experiments, p2p_study


def test_tiny_harness_writes_report_plots_and_json(tmp_path, tiny_bert):
    overrides = (
        f"slm-model='{tiny_bert}' data-dir='{BUNDLED_DATA}' data-source='local' cache-dir='{tmp_path / 'cache'}' "
        "num-clients=4 num-clusters=2 max-train-items=400 max-test-items=200 head-rounds=2 threshold-rounds=3"
    )
    out = tmp_path / "exp"
    assert experiments.main(["--seeds", "1", "2", "--quick", "--out", str(out), "-c", overrides]) == 0
    report = (out / "report.md").read_text()
    for row in ("SLM only", "cloud only", "static threshold", "U-HLM rule", "local-only", "flat FedAvg",
                "hierarchical FedAvg (ours)", "random router @ ours", "oracle router @ ours"):
        assert f"| {row}" in report
    assert "+ P2P" not in report and "P2P is off in these runs" in report  # P2P is off by default
    assert "normalised AUC" in report and "Experiment 2" in report and "--seeds 1 2 --quick" in report
    for png in ("convergence.png", "tradeoff_rate.png", "tradeoff_bytes.png", "non_iid.png"):
        assert (out / png).stat().st_size > 1000
    data = json.loads((out / "experiments.json").read_text())
    acc = data["combined"]["rows"]["hierarchical FedAvg (ours)"]["accuracy"]
    assert acc["n"] == 2 and 0.0 <= acc["mean"] <= 1.0
    oracle = data["combined"]["rows"]["oracle router @ ours"]["accuracy"]["mean"]
    random_ = data["combined"]["rows"]["random router @ ours"]["accuracy"]["mean"]
    assert oracle >= random_  # the upper bound is never below the random router at the same rate
    frontier = data["combined"]["frontier"]
    assert list(frontier) == ["default", "no-ngrams"]  # the quick levers, each a federated run per seed
    for row in frontier.values():
        assert row["slm_accuracy"]["n"] == 2
        for rate in ("1%", "2%", "5%", "10%"):  # never above the oracle router at the same rate
            assert row[f"acc@{rate}"]["mean"] <= row[f"oracle@{rate}"]["mean"] + 1e-12
        assert set(row["measures"]) >= {"entropy", "margin", "temperature-perturbation", "margin, temperature-scaled"}
    assert f"| {frontier_mod.LEVERS['no-ngrams'].description} |" in report and "## Frontier of SLM levers" in report


def test_oracle_sensitivity_adds_the_models_given_on_the_command_line():
    from fedhlm_app.tools.experiments import oracle_variants

    assert set(oracle_variants("", "")) == {"hierarchical", "noisy-0.95", "noisy-0.9", "noisy-0.8"}
    runs = oracle_variants("models/cloud-minilm", "smollm2")
    assert runs["classifier"] == {"oracle": "classifier", "oracle-model": "models/cloud-minilm"}
    assert runs["causal-lm"] == {"oracle": "causal-lm", "oracle-model": "smollm2"}


def test_p2p_study_replays_every_bound_and_reproduces_its_runs(tmp_path, tiny_bert):
    """The lambda sweep with P2P on, every bound replayed from the runs' models and checkpoints; at the
    runs' own bound the replay gives the runs' own accuracy and LLM rate (with peer answers in
    ``test_apps_inprocess``)."""
    overrides = (
        f"slm-model='{tiny_bert}' data-dir='{BUNDLED_DATA}' data-source='local' cache-dir='{tmp_path / 'cache'}' "
        "num-clients=4 num-clusters=2 max-train-items=400 max-test-items=200 head-rounds=2 threshold-rounds=3"
    )
    out = tmp_path / "exp"
    assert experiments.main(["--only", "p2p", "--seeds", "1", "--quick", "--out", str(out), "-c", overrides]) == 0
    data = json.loads((out / "p2p.json").read_text())
    table = data["per_seed"][0]
    assert table["replay"]["largest_difference"] == 0.0
    assert {f"lambda=0.0, bound {b}" for b in p2p_study.BOUNDS} <= set(table) and "curve, no P2P" in table
    report = (out / "p2p.md").read_text()
    assert "False reuse on the test items, per bound" in report and "| off |" in report

"""One real `flwr run` of conf/smoke.toml: SuperLink, Ray simulation, the packaged SLM."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT


def test_smoke_preset_finishes_completed(tmp_path):
    results_dir, flwr_home = tmp_path / "results", tmp_path / "flwr_home"
    proc = subprocess.run(
        [
            sys.executable, "-m", "fedhlm_app.tools.launch", "conf/smoke.toml", "--flwr-home", str(flwr_home),
            "-c", f"results-dir='{results_dir}' cache-dir='{tmp_path / 'cache'}' run-name='ci-smoke'",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    # `flwr run` exits 0 even when the app fails: the launcher asks `flwr ls` for the status.
    assert "run status finished:completed" in proc.stdout, tail
    assert proc.returncode == 0, tail
    results = json.loads((results_dir / "latest" / "results.json").read_text())
    assert results["run_name"] == "ci-smoke"
    assert results["num_test_items"] == 200 and len(results["clients"]) == 4
    assert results["config"]["slm-model"] == "minilm"
    # a real sentence encoder with a trained head beats chance by far on AG News
    assert results["baselines"]["slm_only"]["accuracy"] > 0.5
    assert "FedHLM (learned thresholds)" in proc.stdout + proc.stderr


@pytest.mark.parametrize("strategies", [
    "edge-strategy='Krum' edge-strategy-args='{num_malicious_nodes = 0}' cloud-strategy='FedAdam' cloud-strategy-args='{eta = 0.01}'",
    "edge-strategy='examples.median_of_means:MedianOfMeans' edge-strategy-args='{groups = 2}' cloud-strategy='FedYogi'",
])
def test_flower_and_user_strategies_finish_completed(tmp_path, strategies):
    """Krum at the edge and FedAdam in the cloud; a user's own strategy by import path (packaged with the app)."""
    results_dir, flwr_home = tmp_path / "results", tmp_path / "flwr_home"
    proc = subprocess.run(
        [
            sys.executable, "-m", "fedhlm_app.tools.launch", "conf/smoke.toml", "--flwr-home", str(flwr_home),
            "-c", f"results-dir='{results_dir}' cache-dir='{tmp_path / 'cache'}' run-name='ci-strategies' {strategies}",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert "run status finished:completed" in proc.stdout, tail
    results = json.loads((results_dir / "latest" / "results.json").read_text())
    edge, cloud = strategies.split("edge-strategy='")[1].split("'")[0], strategies.split("cloud-strategy='")[1].split("'")[0]
    assert (results["config"]["edge-strategy"], results["config"]["cloud-strategy"]) == (edge, cloud)
    assert f"edge '{edge}'" in proc.stdout + proc.stderr and f"then cloud '{cloud}'" in proc.stdout + proc.stderr
    assert len(results["thresholds"]["rounds"]) == results["config"]["threshold-rounds"]

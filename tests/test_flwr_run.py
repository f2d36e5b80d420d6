"""One real `flwr run` of conf/smoke.toml: SuperLink, Ray simulation, the packaged SLM."""

import json
import subprocess
import sys

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

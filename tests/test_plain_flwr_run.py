"""Plain `flwr run .`, the first command a Flower user types, with Flower's own managed SuperLink."""

import os
import subprocess
import time

import psutil

from fedhlm_app.paths import BUNDLED_DATA
from fedhlm_app.tools.launch import flower_bin, stage_app


def _flwr_run(app, home, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "FLWR_HOME": str(home), "FEDHLM_DATA_DIR": str(BUNDLED_DATA), "HF_HUB_OFFLINE": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{os.path.dirname(flower_bin('flwr'))}:{os.environ.get('PATH', '')}"}
    started = time.monotonic()
    result = subprocess.run([flower_bin("flwr"), "run", ".", "--stream", *args], cwd=app, env=env, capture_output=True,
                            text=True, timeout=timeout)
    return result, time.monotonic() - started


def _stop_managed_superlink(home) -> list[str]:
    """Flower leaves its managed local SuperLink running by design: stop it as the README says (by PID)."""
    stopped = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "flower-super" in " ".join(proc.info["cmdline"] or []) and proc.environ().get("FLWR_HOME") == str(home):
                proc.terminate()
                stopped.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    psutil.wait_procs(stopped, timeout=20)
    return [" ".join(p.cmdline()) for p in stopped if p.is_running()]


def test_plain_flwr_run_with_too_few_supernodes_stops_fast_and_names_the_fix(tmp_path):
    app, home = stage_app(tmp_path / "app"), tmp_path / "home"
    try:
        result, seconds = _flwr_run(app, home, "--run-config", "results-dir='/tmp/unused' node-wait=5.0", timeout=300)
    finally:
        left = _stop_managed_superlink(home)
    out = result.stdout + result.stderr
    assert 'pass --federation-config "num-supernodes=20"' in out, out[-3000:]
    assert "only 2 of the 20 SuperNodes" in out
    assert seconds < 60, seconds
    assert not left


def test_plain_flwr_run_of_the_smoke_preset_completes_and_names_its_results(tmp_path):
    app, home = stage_app(tmp_path / "app"), tmp_path / "home"
    pairs = (f"num-clients=4 num-clusters=2 max-train-items=400 max-test-items=200 head-rounds=2 threshold-rounds=3 "
             f"results-dir='{tmp_path / 'results'}' run-name='plain'")
    try:
        result, _ = _flwr_run(app, home, "--run-config", pairs, "--federation-config", "num-supernodes=4")
    finally:
        left = _stop_managed_superlink(home)
    out = result.stdout + result.stderr
    assert f"run 'plain': results in {tmp_path / 'results' / 'plain'}" in out, out[-3000:]
    assert (tmp_path / "results" / "plain" / "results.json").is_file(), out[-3000:]
    assert not left

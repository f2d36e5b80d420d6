"""Interrupting the real launcher (SIGINT as Ctrl-C sends it, SIGTERM as `timeout` and process
managers do) stops the run and every process under it; the checkpoint stays valid, and a resume
finishes with the thresholds of an uninterrupted run."""

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from fedhlm_app.app import checkpoint
from fedhlm_app.config import validate
from fedhlm_app.tools.inprocess import run_inprocess
from fedhlm_app.tools.launch import merged_config, with_default_paths
from helpers import ROOT

# Once the smoke run's thresholds settle, a round takes about a tenth of a second, and the launcher
# streams the run's log in batches: enough rounds that the signal lands mid-training on a busy machine.
ROUNDS = 600


def _launch(tmp_path, *overrides: str) -> subprocess.Popen:
    config = f"results-dir='{tmp_path / 'results'}' cache-dir='{tmp_path / 'cache'}' run-name='cut' threshold-rounds={ROUNDS}"
    return subprocess.Popen(
        [sys.executable, "-m", "fedhlm_app.tools.launch", "conf/smoke.toml", "--flwr-home", str(tmp_path / "home"),
         "-c", config, *sum((["-c", o] for o in overrides), [])],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for(proc: subprocess.Popen, marker: str, timeout: float = 600) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"'{marker}' never came:\n{''.join(lines[-40:])}")


@pytest.mark.parametrize("sig, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_launch_leaves_nothing_running_and_resumes(tmp_path, sig, exit_code):
    proc = _launch(tmp_path)
    _wait_for(proc, "threshold round 3:")
    tree = psutil.Process(proc.pid).children(recursive=True)  # SuperLink, SuperExec, simulation, Ray
    assert any("superlink" in " ".join(p.cmdline()) for p in tree)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == exit_code, out[-3000:]
    assert "continue with -c \"run-name='cut' resume=true\"" in out
    survivors = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not survivors, [" ".join(p.cmdline())[:120] for p in survivors]

    cfg = validate(with_default_paths(merged_config([str(ROOT / "conf" / "smoke.toml")], [
        f"results-dir='{tmp_path / 'results'}' cache-dir='{tmp_path / 'cache'}' run-name='cut' threshold-rounds={ROUNDS}"])))
    saved = checkpoint.load(tmp_path / "results" / "cut" / checkpoint.CHECKPOINT_FILE, cfg)
    assert 3 <= saved.threshold_done < ROUNDS  # a valid checkpoint of a completed round, not the end

    again = subprocess.run(
        [sys.executable, "-m", "fedhlm_app.tools.launch", "conf/smoke.toml", "--flwr-home", str(tmp_path / "home"),
         "-c", f"results-dir='{tmp_path / 'results'}' cache-dir='{tmp_path / 'cache'}' run-name='cut' threshold-rounds={ROUNDS}",
         "-c", "resume=true"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert "run status finished:completed" in again.stdout, (again.stdout + again.stderr)[-3000:]
    resumed = json.loads((tmp_path / "results" / "cut" / "results.json").read_text())

    reference = {**cfg.as_dict(), "run-name": "reference"}
    run_inprocess(reference)
    uninterrupted = json.loads((tmp_path / "results" / "reference" / "results.json").read_text())
    assert resumed["thresholds"]["global"] == pytest.approx(uninterrupted["thresholds"]["global"], abs=1e-9)

"""What a careless user runs into ends in one clear message, never in lost results or a late crash."""

import json
import subprocess
import sys
import time

import pytest

from fedhlm_app.config import validate
from fedhlm_app.oracle.base import OracleError
from fedhlm_app.oracle.http import JSONClient
from fedhlm_app.paths import BUNDLED_DATA
from fedhlm_app.reporting.results import policy_summary
from fedhlm_app.reporting.run_folder import RunFolder, RunFolderError
from fedhlm_app.tools.launch import free_port, parse_overrides
from helpers import ROOT, default_run_config


def _check(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    paths = f"results-dir='{tmp_path / 'results'}' cache-dir='{tmp_path / 'cache'}'"
    return subprocess.run([sys.executable, "-m", "fedhlm_app.tools.launch", "conf/smoke.toml", "-c", paths,
                           *sum((["-c", o] for o in overrides), []), "--check-only"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})


@pytest.mark.parametrize("override, message", [
    ("slm-model='/no/such/model'", "slm-model '/no/such/model': no such folder"),
    ("slm-model='some-org/some-model'", "the Hugging Face Hub is offline"),
    ("oracle='classifier' oracle-model='/no/model'", "oracle-model '/no/model': no config.json there"),
    ("oracle='causal-lm' oracle-model='/no/model.gguf'", "oracle-model '/no/model.gguf': not smollm2, gemma3"),
    ("oracle='remote' oracle-url='http://127.0.0.1:{port}'", "does not answer"),
    ("oracle='openai' oracle-url='http://127.0.0.1:{port}/v1' oracle-model='m'", "does not answer"),
    ("results-dir='/proc/no-results'", "results-dir '/proc/no-results' is not writable"),
    ("run-name='latest'", "not 'latest'"),
    ("run-name='typo' resume=true", "has no checkpoint at"),
    ("data-dir='/tmp/no such folder'", "data-dir '/tmp/no such folder' is not a directory"),  # a quoted value keeps its spaces
])
def test_check_only_catches_what_would_fail_later(tmp_path, override, message):
    result = _check(tmp_path, override.format(port=free_port()))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_check_only_accepts_a_good_config(tmp_path):
    result = _check(tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr


def test_a_run_folder_is_never_overwritten_silently(tmp_path):
    folder = tmp_path / "results" / "mine"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text("{}")
    result = _check(tmp_path, "run-name='mine' overwrite=false")  # smoke.toml replaces its own runs; a user's may not
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert _check(tmp_path, "run-name='mine' overwrite=true").returncode == 0
    cfg = validate(default_run_config(**{"run-name": "mine", "results-dir": str(tmp_path / "results"), "overwrite": False}))
    with pytest.raises(RunFolderError, match="resume = true, or replace it with overwrite = true"):
        RunFolder.of(cfg).check_start(cfg)
    assert (folder / "results.json").read_text() == "{}"


def test_one_process_holds_a_run_folder(tmp_path, tiny_bert):
    from fedhlm_app.tools.inprocess import run_inprocess

    rc = default_run_config(**{"slm-model": str(tiny_bert), "data-source": "local", "data-dir": str(BUNDLED_DATA),
                               "results-dir": str(tmp_path / "results"), "cache-dir": str(tmp_path / "cache"), "run-name": "held"})
    with RunFolder(tmp_path / "results" / "held").locked():  # another run writes this folder right now
        with pytest.raises(RunFolderError, match=r"is in use by another run \(pid \d+\)"):
            run_inprocess(rc)
    assert not (tmp_path / "results" / "held" / "results.json").exists()
    run_inprocess(rc)  # once it is free, the run goes ahead
    assert json.loads((tmp_path / "results" / "held" / "results.json").read_text())["run_name"] == "held"


def test_a_dead_server_costs_a_phase_a_few_requests_not_one_per_item():
    client = JSONClient(f"http://127.0.0.1:{free_port()}", retries=2)
    client.breaker.limit = 3
    started = time.monotonic()
    for _ in range(3):
        with pytest.raises(OracleError, match="failed after 3 attempts"):
            client.request("POST", "/v1/verify", {})
    tried = time.monotonic() - started  # three requests, each with two backed-off retries
    started = time.monotonic()
    for _ in range(100):
        with pytest.raises(OracleError, match="not called: its last 3 requests failed"):
            client.request("POST", "/v1/verify", {})
    assert time.monotonic() - started < tried / 10
    client.breaker.reset()  # the next phase tries again
    with pytest.raises(OracleError, match="failed after 3 attempts"):
        client.request("POST", "/v1/verify", {})


def test_overrides_keep_quoted_spaces_and_refuse_what_they_cannot_read():
    assert parse_overrides("data-dir='/a b/c' kappa=3.0 run-name=\"x y\" p2p=false") == {
        "data-dir": "/a b/c", "kappa": 3.0, "run-name": "x y", "p2p": False}
    with pytest.raises(Exception, match="cannot read 'kappa 3'"):
        parse_overrides("kappa 3")


def test_a_policy_without_items_has_every_share_zero():
    row = {"num-examples": 0, "correct": 0, "escalated": 0, "p2p-own": 0, "p2p-neighbour": 0, "slm-correct": 0, "oracle-failed": 0}
    summary = policy_summary({1: row})
    assert summary["num_items"] == 0 and summary["p2p_rate"] == 0.0 and summary["accuracy"] == 0.0

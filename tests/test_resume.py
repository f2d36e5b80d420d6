"""Crash safety: a run killed mid-training and resumed ends where an uninterrupted run ends."""

import json

import numpy as np
import pytest

from client_app import app as client_app
from fedhlm_app.app import checkpoint
from fedhlm_app.config import ConfigError, validate
from fedhlm_app.paths import BUNDLED_DATA
from helpers import LocalGrid, default_run_config, server_context
from server_app import app as server_app

NODES = [{"partition-id": i, "num-partitions": 5, "cluster-id": 0 if i < 3 else 1} for i in range(5)]


class Crash(Exception):
    """The ServerApp's machine going down."""


class CrashingGrid(LocalGrid):
    """Goes down when the ServerApp starts threshold round ``crash_at``."""

    def __init__(self, *args, crash_at: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.crash_at, self.threshold_rounds = crash_at, 0

    def push_messages(self, messages):
        if messages and messages[0].metadata.message_type == "query.calibrate":
            self.threshold_rounds += 1
            if self.threshold_rounds == self.crash_at:
                raise Crash(f"down at threshold round {self.crash_at}")
        return super().push_messages(messages)


def _config(tmp_path, tiny_bert, run_name, **overrides):
    return default_run_config(**{
        "slm-model": str(tiny_bert), "data-source": "local", "data-dir": str(BUNDLED_DATA), "num-clients": 5,
        "cache-dir": str(tmp_path / "cache"), "results-dir": str(tmp_path / "results"), "run-name": run_name,
        "threshold-rounds": 4, "tau-init": 0.95, "personalization-alpha": 0.5, "exploration-band": 0.3, **overrides,
    })


def _results(tmp_path, run_name):
    return json.loads((tmp_path / "results" / run_name / "results.json").read_text())


# The default strategies, and stateful ones (server momentum per cluster, Adam in the cloud) whose
# state must come back from the checkpoint for the resumed run to end where the whole one ends.
STRATEGIES = [{}, {"edge-strategy": "FedAvgM", "edge-strategy-args": "{server_momentum = 0.5}",
                   "cloud-strategy": "FedAdam", "cloud-strategy-args": "{eta = 0.05}"}]


@pytest.fixture(scope="module", params=STRATEGIES, ids=["fedavg", "fedavgm-fedadam"])
def runs(request, tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("resume")
    whole = _config(tmp, tiny_bert, "whole", **request.param)
    server_app(LocalGrid(client_app, NODES, whole), server_context(whole))

    broken = _config(tmp, tiny_bert, "broken", **request.param)
    with pytest.raises(Crash):
        server_app(CrashingGrid(client_app, NODES, broken, crash_at=3), server_context(broken))
    saved = checkpoint.load(tmp / "results" / "broken" / checkpoint.CHECKPOINT_FILE, validate(broken))

    # A new federation: fresh client state and new node ids, as after restarting every process.
    resumed = _config(tmp, tiny_bert, "broken", resume=True, **request.param)
    server_app(LocalGrid(client_app, NODES, resumed, first_node_id=5000), server_context(resumed))
    return tmp, saved, _results(tmp, "whole"), _results(tmp, "broken")


def test_the_checkpoint_holds_the_last_completed_round(runs):
    _, saved, _, _ = runs
    assert saved.head.done == 2 and saved.threshold_done == 2 and len(saved.rounds) == 2
    assert set(saved.clients) == set(range(5)) and all("tau" in held and "ids" in held for held in saved.clients.values())


def test_a_resumed_run_ends_with_the_thresholds_of_an_uninterrupted_one(runs):
    _, _, whole, resumed = runs
    assert [r["round"] for r in resumed["thresholds"]["rounds"]] == [1, 2, 3, 4]
    # equal up to the last bits (numpy's SIMD sums depend on array alignment)
    np.testing.assert_allclose(resumed["thresholds"]["global"], whole["thresholds"]["global"], rtol=0, atol=1e-12)
    for cluster, taus in whole["thresholds"]["clusters"].items():
        np.testing.assert_allclose(resumed["thresholds"]["clusters"][cluster], taus, rtol=0, atol=1e-12)
    # personalized thresholds (alpha 0.5) depend on each client's own history, restored from the checkpoint
    np.testing.assert_allclose([c["tau"] for c in resumed["clients"]], [c["tau"] for c in whole["clients"]], atol=1e-12)
    assert resumed["accuracy"] == whole["accuracy"] and resumed["llm_rate"] == whole["llm_rate"]
    assert resumed["training"]["llm_items"] == whole["training"]["llm_items"]


def test_same_seed_same_partitions_thresholds_and_metrics(runs):
    _, saved, whole, _ = runs
    # the crashed run's first two rounds, computed independently, equal the whole run's
    np.testing.assert_allclose([r["tau_global"] for r in saved.rounds], whole["thresholds"]["global"][:2], rtol=0, atol=1e-12)
    np.testing.assert_allclose([r["loss"] for r in saved.rounds], [r["loss"] for r in whole["thresholds"]["rounds"][:2]],
                               rtol=0, atol=1e-12)
    assert [r["llm_items"] for r in saved.rounds] == [r["llm_items"] for r in whole["thresholds"]["rounds"][:2]]


def test_resuming_with_another_config_is_refused_by_name(runs, tiny_bert):
    tmp, _, _, _ = runs
    changed = validate(_config(tmp, tiny_bert, "broken", kappa=10.0, resume=True))
    with pytest.raises(checkpoint.CheckpointError, match=r"kappa: 20.0 -> 10.0"):
        checkpoint.load(tmp / "results" / "broken" / checkpoint.CHECKPOINT_FILE, changed)


def test_resume_needs_a_run_name(tmp_path, tiny_bert):
    with pytest.raises(ConfigError, match="'resume' = true: needs a 'run-name'"):
        validate(_config(tmp_path, tiny_bert, "", resume=True))


def test_a_run_resumed_after_fine_tuning_reinstalls_the_encoder_instead_of_training_it_again(tmp_path, tiny_bert):
    from fedhlm_app.slm.finetune import arrays_digest

    tuning = {"encoder-rounds": 2, "encoder-layers": 1, "encoder-steps": 2, "encoder-batch-size": 8, "threshold-rounds": 3}
    broken = _config(tmp_path, tiny_bert, "broken-ft", **tuning)
    with pytest.raises(Crash):
        server_app(CrashingGrid(client_app, NODES, broken, crash_at=2), server_context(broken))
    saved = checkpoint.load(tmp_path / "results" / "broken-ft" / checkpoint.CHECKPOINT_FILE, validate(broken))
    assert saved.encoder.done == 2 and saved.threshold_done == 1
    resumed = _config(tmp_path, tiny_bert, "broken-ft", resume=True, **tuning)
    grid = LocalGrid(client_app, NODES, resumed, first_node_id=5000)
    server_app(grid, server_context(resumed))
    assert grid.sent.count("train.encoder") == 0 and grid.sent.count("query.install_encoder") == 5
    # every new node runs the very encoder the crashed run trained
    model = np.load(tmp_path / "results" / "broken-ft" / "model.npz")
    installed = [model[f"encoder_{i}"] for i in range(len(saved.encoder.params))]
    assert all(np.array_equal(a, b) for a, b in zip(installed, saved.encoder.params))
    paths = {str(grid.state(n)["encoder"]["path"]) for n in grid.get_node_ids()}
    assert paths == {str(tmp_path / "cache" / "models" / f"tuned-{arrays_digest(saved.encoder.params)}")}
    results = _results(tmp_path, "broken-ft")
    assert [r["round"] for r in results["encoder_rounds"]] == [1, 2]
    assert [r["round"] for r in results["thresholds"]["rounds"]] == [1, 2, 3]
    # and it ends where an uninterrupted run with the same seed ends
    whole = _config(tmp_path, tiny_bert, "whole-ft", **tuning)
    server_app(LocalGrid(client_app, NODES, whole), server_context(whole))
    expected = _results(tmp_path, "whole-ft")
    np.testing.assert_allclose(results["thresholds"]["global"], expected["thresholds"]["global"], rtol=0, atol=1e-12)
    assert results["accuracy"] == expected["accuracy"]

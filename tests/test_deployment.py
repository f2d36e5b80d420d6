"""A real deployment on loopback: SuperLink with TLS and node authentication, five SuperNodes.

Runs conf/smoke.toml across 4 clusters (node 1 shares cluster 0 with node 0), checks
that an unregistered key is refused, kills one SuperNode mid-run (SIGKILL, as a crash)
and checks that the run completes with the others, records the dropout, and that
every process is gone afterwards. Each process has its own FLWR_HOME under tmp_path.
"""

import json
import os
import signal
import threading
import time

import psutil
import pytest

from fedhlm_app.config import validate
from fedhlm_app.tools.deploy.credentials import write_node_key
from fedhlm_app.tools.deploy.loopback import LoopbackDeployment
from fedhlm_app.tools.launch import merged_config, with_default_paths
from helpers import ROOT

CLUSTERS = [0, 0, 1, 2, 3]  # node -> cluster-id
VICTIM = 1  # dies once its replies to setup and the first head round are delivered


def _kill_when_logged(log_path, text: str, times: int, proc, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if log_path.exists() and log_path.read_text(errors="replace").count(text) >= times:
            os.kill(proc.pid, signal.SIGKILL)  # a crash: no goodbye to the SuperLink
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deployment")
    overrides = (f"num-clients={len(CLUSTERS)} num-clusters={len(set(CLUSTERS))} run-name='deployed' "
                 f"results-dir='{tmp / 'results'}' cache-dir='{tmp / 'cache'}'")
    cfg = validate(with_default_paths(merged_config([str(ROOT / "conf" / "smoke.toml")], [overrides])))
    with LoopbackDeployment(tmp / "deploy", cfg) as dep:
        dep.prepare(len(CLUSTERS))
        dep.start_superlink()

        write_node_key(dep.secrets / "intruder")  # a valid key pair that was never registered
        intruder = dep.start_supernode(len(CLUSTERS), cluster=0, num_partitions=len(CLUSTERS),
                                       key=dep.secrets / "intruder")
        intruder_exit = intruder.wait(timeout=120)

        for node, cluster in enumerate(CLUSTERS):
            dep.register(node, cluster)
        nodes = {node: dep.start_supernode(node, cluster, len(CLUSTERS)) for node, cluster in enumerate(CLUSTERS)}
        killer = threading.Thread(target=_kill_when_logged, daemon=True, args=(
            dep.workdir / f"supernode-{VICTIM}.log", "Sent successfully", 2, nodes[VICTIM]))
        killer.start()
        status = dep.run()
        killer.join(timeout=1)
        descendants = {p.pid for proc in dep.processes.values() if proc.poll() is None
                       for p in psutil.Process(proc.pid).children(recursive=True)}
    return {"status": status, "dep": dep, "intruder_exit": intruder_exit, "descendants": descendants,
            "results": json.loads((tmp / "results" / "deployed" / "results.json").read_text())}


def test_the_run_completes_over_tls_with_authenticated_supernodes(deployment):
    assert deployment["status"] == "finished:completed", (deployment["dep"].workdir / "superlink.log").read_text()[-3000:]


def test_a_supernode_with_an_unregistered_key_is_refused(deployment):
    assert deployment["intruder_exit"] != 0
    log = (deployment["dep"].workdir / f"supernode-{len(CLUSTERS)}.log").read_text()
    assert "Failed to activate SuperNode" in log


def test_every_cluster_aggregated_and_the_dead_node_is_recorded(deployment):
    results = deployment["results"]
    assert results["dropouts"] and [d["cluster"] for d in results["dropouts"]] == [CLUSTERS[VICTIM]]
    assert results["dropouts"][0]["partition_id"] == VICTIM and results["dropouts"][0]["phase"] == "head"
    survivors = [c for node, c in enumerate(CLUSTERS) if node != VICTIM]
    assert sorted(c["cluster"] for c in results["clients"]) == sorted(survivors)
    assert sorted(results["clusters"], key=int) == ["0", "1", "2", "3"]
    for r in results["thresholds"]["rounds"]:
        assert sorted(r["tau_clusters"], key=int) == ["0", "1", "2", "3"] and r["clients"] == len(survivors)
    # each node read its own folder (data-path): the dead node's test items are not scored
    assert sum(c["num_test"] for c in results["clients"]) < results["config"]["max-test-items"]


def test_nothing_is_left_running(deployment):
    assert all(proc.poll() is not None for proc in deployment["dep"].processes.values())
    assert not [pid for pid in deployment["descendants"] if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]

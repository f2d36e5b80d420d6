"""The simulation on an existing Ray cluster: a head and a second node (two raylets) on loopback;
the launcher's Flower simulation joins it through RAY_ADDRESS and places ClientApps on both nodes."""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from fedhlm_app.tools.launch import flower_bin, free_port
from helpers import ROOT


def _ray(*args: str) -> None:
    subprocess.run([flower_bin("ray"), *args], check=True, capture_output=True, timeout=120)


def test_the_simulation_runs_its_clientapps_on_every_node_of_a_ray_cluster(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    # The cluster's own temp folder (short: Ray's socket paths must stay under 108 characters): every
    # process of the cluster names it, which is how the test stops exactly this cluster.
    session_root = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={session_root}")
    try:
        _ray("start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats")
        hosts: dict[int, int] = {}  # ClientAppActor pid -> the raylet (node) that runs it
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                for proc in psutil.process_iter(["cmdline", "ppid"]):
                    try:
                        if "ClientAppActor" in " ".join(proc.info["cmdline"] or []):
                            if "raylet" in " ".join(psutil.Process(proc.info["ppid"]).cmdline()):
                                hosts[proc.pid] = proc.info["ppid"]
                    except psutil.Error:
                        continue
                time.sleep(0.3)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        result = subprocess.run(
            [sys.executable, "-m", "fedhlm_app.tools.launch", "conf/smoke.toml", "--flwr-home", str(tmp_path / "home"),
             "-c", f"results-dir='{tmp_path / 'results'}' cache-dir='{tmp_path / 'cache'}' run-name='cluster'"],
            cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "RAY_ADDRESS": address, "HF_HUB_OFFLINE": "1"},
        )
        done.set()
        watcher.join()
        assert "run status finished:completed" in result.stdout, (result.stdout + result.stderr)[-3000:]
        raylets = {p.pid for p in psutil.process_iter(["cmdline"]) if "raylet/raylet" in " ".join(p.info["cmdline"] or [])}
        assert len(raylets) == 2
        assert set(hosts.values()) == raylets, hosts  # ClientApp actors on both nodes
        assert (tmp_path / "results" / "cluster" / "results.json").is_file()
    finally:
        _stop_cluster(session_root, port)


def _stop_cluster(session_root: str, port: int) -> None:
    """This cluster's processes only (``ray stop`` would end every Ray on the machine): those that name
    its temp folder or its port, and what they started. Ray's pointer to 'the current cluster' goes
    too, so that a later ``ray.init()`` starts its own instead of dialling this one."""
    marks = (session_root, f":{port} ", f":{port}", f"_port={port}", f"--port={port}")
    ours = [p for p in psutil.process_iter(["cmdline"]) if any(m in " ".join(p.info["cmdline"] or []) for m in marks)
            and p.pid != os.getpid()]
    tree = {q for p in ours for q in [p, *p.children(recursive=True)]}
    for proc in tree:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(list(tree), timeout=30)
    for pointer in (Path(session_root) / "ray_current_cluster", Path("/tmp/ray/ray_current_cluster")):
        if pointer.is_file() and pointer.read_text().strip().endswith(f":{port}"):
            pointer.unlink()
    shutil.rmtree(session_root, ignore_errors=True)

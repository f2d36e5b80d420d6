"""A whole secured FedHLM deployment on one machine: real SuperLink and SuperNodes on loopback.

    python -m fedhlm_app.tools.deploy.loopback conf/smoke.toml --nodes 4 [-c "key=value ..."]

The steps of docs/deployment.md, with every process started and stopped by PID:

1. a test CA, the SuperLink's certificate and one ECDSA key per SuperNode
   (``fedhlm_app.tools.deploy.credentials``); one data folder per SuperNode (``node_data``);
2. ``flower-superlink`` with TLS and ``--enable-supernode-auth``;
3. ``flwr supernode register`` for each node's public key;
4. one ``flower-supernode`` per node, each with its own Flower home, port, key and
   ``--node-config "cluster-id=.. partition-id=.. num-partitions=.. data-path=.."``;
5. ``flwr run`` of the app over the TLS connection, then its status from ``flwr ls``.

Everything lives under ``--workdir`` (logs included); nothing is left running.
"""

from __future__ import annotations

import argparse
import os
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedhlm_app.config import ConfigError, RunConfig, validate
from fedhlm_app.data.datasets import DataError, load_local, resolve_data_dir
from fedhlm_app.tools.deploy.credentials import write_node_key, write_tls
from fedhlm_app.tools.deploy.node_data import write_node_folders
from fedhlm_app.tools.launch import (
    ROOT, check_local_data, flower_bin, flower_env, free_port, merged_config, run_app, stop, wait_healthy, with_default_paths,
    write_connection,
)
from fedhlm_app.data.partition import cluster_of_partition

CONNECTION = "fedhlm-loopback"


@dataclass
class LoopbackDeployment:
    """One SuperLink and its SuperNodes under ``workdir``; a context manager that stops them all."""

    workdir: Path
    cfg: RunConfig  # the validated run config, absolute paths
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # name -> process
    port: int = 0

    @property
    def secrets(self) -> Path:
        return self.workdir / "secrets"

    @property
    def cli_home(self) -> Path:
        return self.workdir / "flwr-cli"

    def __enter__(self) -> "LoopbackDeployment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def prepare(self, num_nodes: int) -> None:
        """Credentials for the SuperLink and ``num_nodes`` SuperNodes, and their data folders."""
        self.secrets.mkdir(parents=True, exist_ok=True)
        write_tls(self.secrets, ["localhost", "127.0.0.1"])
        for i in range(num_nodes):
            write_node_key(self.secrets / f"node-{i}")
        dataset = load_local(resolve_data_dir(self.cfg.data_dir), self.cfg.train_file, self.cfg.test_file)
        write_node_folders(dataset, self.cfg, num_nodes, self.workdir / "node-data")

    def _start(self, name: str, cmd: list[str], flwr_home: Path) -> subprocess.Popen:
        flwr_home.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / f"{name}.log", "w") as log_file:
            proc = subprocess.Popen(cmd, env=flower_env(flwr_home), cwd=self.workdir, stdout=log_file, stderr=subprocess.STDOUT)
        self.processes[name] = proc
        return proc

    def start_superlink(self) -> None:
        """TLS on the one HTTPS port (Fleet, Control and Runtime APIs); only registered nodes may join."""
        self.port = free_port()
        proc = self._start("superlink", [
            flower_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
            "--ssl-ca-certfile", str(self.secrets / "ca.crt"), "--ssl-certfile", str(self.secrets / "server.pem"),
            "--ssl-keyfile", str(self.secrets / "server.key"), "--enable-supernode-auth",
            "--database", str(self.workdir / "superlink-state.db"), "--disable-runtime-dependency-installation",
        ], self.workdir / "flwr-superlink")
        context = ssl.create_default_context(cafile=str(self.secrets / "ca.crt"))
        wait_healthy(f"https://127.0.0.1:{self.port}/health", proc, "SuperLink", self.workdir / "superlink.log", context=context)
        write_connection(self.cli_home, CONNECTION, f"127.0.0.1:{self.port}", self.secrets / "ca.crt")

    def register(self, node: int, cluster: int) -> None:
        """Register node ``node``'s public key (before it connects); its name carries the cluster."""
        cmd = [flower_bin("flwr"), "supernode", "register", str(self.secrets / f"node-{node}.pub"), CONNECTION,
               "--name", f"cluster-{cluster}/node-{node}"]
        done = subprocess.run(cmd, env=flower_env(self.cli_home), capture_output=True, text=True, timeout=120)
        if done.returncode != 0 or "registered successfully" not in done.stdout:
            raise RuntimeError(f"registering node-{node} failed: {done.stdout}{done.stderr}")

    def start_supernode(self, node: int, cluster: int, num_partitions: int, key: Path | None = None) -> subprocess.Popen:
        """A SuperNode holding partition ``node`` (its own data folder), in cluster ``cluster``."""
        data_path = self.workdir / "node-data" / f"partition-{node}"
        node_config = f'cluster-id={cluster} partition-id={node} num-partitions={num_partitions} data-path="{data_path}"'
        return self._start(f"supernode-{node}", [
            flower_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.secrets / "ca.crt"),
            "--auth-supernode-private-key", str(key or self.secrets / f"node-{node}"),
            "--port", str(free_port()), "--node-config", node_config,
        ], self.workdir / f"flwr-supernode-{node}")

    def run(self) -> str:
        """``flwr run`` the app with the run config over the TLS connection; the final status."""
        return run_app(self.cfg, self.workdir / "app", CONNECTION, flower_env(self.cli_home))

    def stop_all(self) -> None:
        """Stop SuperNodes first (they would keep reconnecting), then the SuperLink, then any child left.

        Their SuperExec children exit on their own once the parent is gone (``--parent-pid``);
        whatever is still alive a few seconds later is killed, so nothing outlives the deployment.
        """
        children = []
        for proc in self.processes.values():
            try:
                children += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for name in sorted(self.processes, key=lambda n: n == "superlink"):
            stop(self.processes[name])
        _, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:
            child.kill()
        psutil.wait_procs(alive, timeout=10)


def deploy(cfg: RunConfig, workdir: Path, num_nodes: int) -> str:
    """The standard sequence: prepare, SuperLink, register and start every node, run; the status."""
    with LoopbackDeployment(workdir, cfg) as deployment:
        deployment.prepare(num_nodes)
        deployment.start_superlink()
        clusters = [cluster_of_partition(i, num_nodes, cfg.num_clusters) for i in range(num_nodes)]
        for node, cluster in enumerate(clusters):
            deployment.register(node, cluster)
        for node, cluster in enumerate(clusters):
            deployment.start_supernode(node, cluster, num_nodes)
        print(f"fedhlm: SuperLink on 127.0.0.1:{deployment.port} (TLS, node authentication), "
              f"{num_nodes} SuperNodes in clusters {sorted(set(clusters))}; logs in {workdir}", flush=True)
        return deployment.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("presets", nargs="*", help="run-config TOML files (conf/*.toml)")
    parser.add_argument("-c", "--run-config", action="append", default=[], help="overrides: \"key=value key2='text'\"")
    parser.add_argument("--nodes", type=int, default=0, help="SuperNodes to start (default: the config's num-clients)")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".deploy-loopback", help="credentials, data, logs")
    args = parser.parse_args(argv)
    try:
        cfg = with_default_paths(merged_config(args.presets, args.run_config))
        nodes = args.nodes or cfg["num-clients"]
        cfg = validate({**cfg, "num-clients": nodes})
        check_local_data(cfg)
    except (ConfigError, DataError) as exc:
        print(f"fedhlm: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    status = deploy(cfg, args.workdir.resolve(), nodes)
    print(f"fedhlm: run status {status} after {time.monotonic() - started:.1f} s")
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

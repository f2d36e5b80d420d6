"""The compose deployment for real (`make docker-test`): the image builds, the SuperLink with TLS and
SuperNode authentication, four SuperNodes in their clusters and the oracle service with TLS and a
token come up, `conf/docker.toml` runs to `finished:completed` while one SuperNode container is
killed (the results name it under `dropouts`), and `docker-compose down` leaves nothing behind.

It needs Docker Engine and takes minutes, so it runs only when FEDHLM_DOCKER_TEST=1 (`make docker-test`).
"""

import json
import os
import secrets
import shutil
import subprocess
import time

import pytest

from fedhlm_app.tools.launch import flower_bin, flower_env, stage_app, write_connection
from helpers import ROOT

pytestmark = pytest.mark.skipif(not os.environ.get("FEDHLM_DOCKER_TEST"), reason="make docker-test runs it (needs Docker Engine)")

PROJECT = "fedhlm-test"
VICTIM = "supernode-3"


def _compose_command() -> list[str]:
    """Compose v2 (`docker compose`) where the plugin is installed, else Compose v1 (`docker-compose`)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("Docker Compose is needed: the compose plugin, or docker-compose")


def _resources() -> dict[str, str]:
    """What the project left on the Docker host: containers, networks, volumes."""
    label = f"label=com.docker.compose.project={PROJECT}"
    return {kind: subprocess.run(["docker", kind, "ls", "-q", "--filter", label] if kind != "container"
                                 else ["docker", "ps", "-aq", "--filter", label], capture_output=True, text=True).stdout.strip()
            for kind in ("container", "network", "volume")}


def test_the_compose_deployment_runs_survives_a_dead_supernode_and_cleans_up(tmp_path):
    started = time.monotonic()
    build = subprocess.run([str(ROOT / "docker" / "build.sh")], capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stderr[-3000:]
    built = time.monotonic() - started
    size = subprocess.run(["docker", "image", "inspect", "fedhlm:latest", "--format", "{{.Size}}"], capture_output=True, text=True)
    print(f"docker-test: image built in {built:.0f} s, {int(size.stdout) / 1e9:.2f} GB; {build.stderr.strip()}")

    folder = tmp_path / "docker"  # the compose file's folder: its ./secrets and ./results bind mounts live here
    uid, gid = (os.getuid(), os.getgid()) if os.getuid() else (1000, 1000)  # the image's user (build.sh: 1000 for root)
    for mount in ("secrets", "results"):
        (folder / mount).mkdir(parents=True)
        os.chown(folder / mount, uid, gid)
    shutil.copy(ROOT / "docker" / "compose.yml", folder / "compose.yml")
    env = {**os.environ, "FEDHLM_ORACLE_TOKEN": secrets.token_urlsafe(24), "FEDHLM_UID": str(uid), "FEDHLM_GID": str(gid)}
    compose = [*_compose_command(), "-p", PROJECT, "-f", str(folder / "compose.yml")]
    try:
        up = subprocess.run([*compose, "up", "-d", "--no-build"], env=env, capture_output=True, text=True, timeout=900)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]

        home = tmp_path / "flwr-home"
        write_connection(home, "fedhlm-docker", "127.0.0.1:9093", folder / "secrets" / "ca.crt")
        app = stage_app(tmp_path / "app")
        shutil.copytree(ROOT / "conf", app / "conf")
        run = subprocess.Popen([flower_bin("flwr"), "run", str(app), "fedhlm-docker", "--run-config", str(app / "conf" / "docker.toml"),
                                "--stream"], cwd=app, env=flower_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        streamed = _kill_when_streamed(run, "threshold round 1:", [*compose, "kill", "-s", "SIGKILL", VICTIM], env)
        listing = subprocess.run([flower_bin("flwr"), "ls", "--format", "json"], env=flower_env(home), capture_output=True, text=True)
        status = json.loads(listing.stdout)["runs"][-1]["status"]
        logs = subprocess.run([*compose, "logs", "--no-color", "--tail", "60", "superexec-serverapp"], env=env,
                              capture_output=True, text=True).stdout
        assert status == "finished:completed", streamed[-3000:] + logs
        results = json.loads((folder / "results" / "docker" / "results.json").read_text())
        assert [d["cluster"] for d in results["dropouts"]] == [3], results["dropouts"]  # the killed SuperNode's
        assert len(results["clients"]) == 3 and results["oracle"]["backend"] == "remote" and results["oracle"]["oracle_failures"] == 0
        print(f"docker-test: finished:completed in {time.monotonic() - started:.0f} s in all; accuracy {results['accuracy']:.4f}, "
              f"LLM rate {results['llm_rate']:.4f}, dropouts {results['dropouts']}")
    finally:
        down = subprocess.run([*compose, "down", "-v", "--remove-orphans"], env=env, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr[-2000:]
    assert _resources() == {"container": "", "network": "", "volume": ""}


def _kill_when_streamed(run: subprocess.Popen, marker: str, kill: list[str], env: dict[str, str]) -> str:
    """Read the run's streamed log; SIGKILL the victim's container when ``marker`` appears (a crash:
    no goodbye to the SuperLink). Returns the whole log once the run ends."""
    lines, killed = [], False
    for line in run.stdout:
        lines.append(line)
        if not killed and marker in line:
            subprocess.run(kill, env=env, capture_output=True, timeout=60)
            killed = True
    run.wait(timeout=60)
    assert killed, f"'{marker}' never came:\n{''.join(lines[-40:])}"
    return "".join(lines)

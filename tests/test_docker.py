"""The Docker deployment (docker/compose.yml, docker/Dockerfile, conf/docker.toml), checked without Docker.

Our machines have no Docker daemon, so nothing here builds an image or starts a container. The
files are parsed and cross-checked instead:

- the services, their one image and its build (context, Dockerfile, COPY sources, .dockerignore);
- the SuperLink: one port, used by every client and published; TLS and SuperNode authentication,
  no ``--insecure`` towards it; each SuperNode's own key, registered before it starts;
- the SuperNodes' ``--node-config`` (parsed as Flower parses it) and their ClientApp SuperExecs;
- volumes, networks, bind mounts, the ``depends_on`` order, the one-shot shell scripts (``sh -n``);
- the oracle's token and TLS, and that the ServerApp trusts it; conf/docker.toml validates and
  agrees with the compose file;
- every ``--flag`` in a command exists in that tool's ``--help``.

Each check is a function of the parsed compose file, so ``test_checks_catch_broken_copies`` can
break a copy and see the check fail.
"""

from __future__ import annotations

import copy
import fnmatch
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
RUN_CONFIG = ROOT / "conf" / "docker.toml"
IMAGE = "fedhlm:latest"
NUM_NODES = 4
SUPERNODES = [f"supernode-{i}" for i in range(NUM_NODES)]
CLIENTAPP_EXECS = [f"superexec-clientapp-{i}" for i in range(NUM_NODES)]
SERVICES = {"credentials", "node-data", "superlink", "superexec-serverapp", "register", "oracle",
            *SUPERNODES, *CLIENTAPP_EXECS}
FLOWER_TOOLS = ("flower-superlink", "flower-supernode", "flower-superexec")
OUR_MODULES = ("fedhlm_app.tools.deploy.credentials", "fedhlm_app.tools.deploy.node_data", "fedhlm_app.oracle.service")
DONE = "service_completed_successfully"
STARTED = "service_started"

Compose = dict[str, Any]


# ----------------------------------------------------------------------------- parsing helpers

def load_compose() -> Compose:
    return yaml.safe_load(COMPOSE.read_text())


def unescape(text: str) -> str:
    """Compose turns ``$$`` into a literal ``$`` (a single ``$`` is compose interpolation)."""
    return text.replace("$$", "$")


def raw_command(service: dict) -> list[str]:
    cmd = service["command"]
    return list(cmd) if isinstance(cmd, list) else shlex.split(cmd)


def shell_script(service: dict) -> str | None:
    """The script of a ``sh -c SCRIPT`` command, else None."""
    cmd = raw_command(service)
    if len(cmd) == 3 and cmd[0] in {"sh", "/bin/sh", "bash"} and cmd[1] == "-c":
        return unescape(cmd[2])
    return None


HEREDOC = re.compile(r"<<-?\s*'?(\w+)'?[^\n]*\n(.*?)\n\s*\1\n", re.S)


def heredocs(script: str) -> list[str]:
    return [body for _, body in HEREDOC.findall(script)]


def _program(tokens: list[str], i: int) -> tuple[str, list[str]] | None:
    """(program, its arguments) when ``tokens[i]`` starts a command we know."""
    tok = tokens[i]
    if tok in FLOWER_TOOLS:
        return tok, tokens[i + 1:]
    if tok == "flwr" and tokens[i + 1:i + 3] == ["supernode", "register"]:
        return "flwr supernode register", tokens[i + 3:]
    if tok in {"python", "python3"} and tokens[i + 1:i + 2] == ["-m"]:
        return tokens[i + 2], tokens[i + 3:]
    return None


def invocations(service: dict) -> list[tuple[str, list[str]]]:
    """Every (program, arguments) the service runs: its command, or each simple command of its script."""
    script = shell_script(service)
    if script is None:
        tokens = [unescape(t) for t in raw_command(service)]
        found = _program(tokens, 0)
        return [found] if found else []
    lexer = shlex.shlex(HEREDOC.sub("\n", script), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments: list[list[str]] = [[]]
    for tok in lexer:  # split at ; && || | ( ) and newlines-as-; alike
        if tok and all(c in "();<>|&" for c in tok):
            if tok[0] in "<>" and segments[-1] and segments[-1][-1].isdigit():
                segments[-1].pop()  # the file descriptor of a redirection such as 2>&1
            segments.append([])
        else:
            segments[-1].append(tok)
    out = []
    for seg in segments:
        for i in range(len(seg)):
            if found := _program(seg, i):
                out.append(found)
                break
    return out


def invocation(compose: Compose, name: str, program: str) -> list[str]:
    """The arguments of the one ``program`` run by service ``name``."""
    found = [args for prog, args in invocations(compose["services"][name]) if prog == program]
    assert len(found) == 1, f"{name}: expected one '{program}' command, found {len(found)}"
    return found[0]


def flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def option(args: list[str], flag: str) -> str:
    """The value of ``flag`` (given exactly once)."""
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]
    values += [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    assert len(values) == 1, f"{flag} given {len(values)} times in {args}"
    return values[0]


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def node_config(compose: Compose, name: str) -> dict[str, Any]:
    """A SuperNode's ``--node-config``, parsed by Flower's own parser."""
    from flwr.common.config import parse_config_args

    return parse_config_args([option(invocation(compose, name, "flower-supernode"), "--node-config")])


def superlink_port(compose: Compose) -> int:
    return int(option(invocation(compose, "superlink", "flower-superlink"), "--port"))


def register_connection(compose: Compose) -> dict[str, Any]:
    """The ``flwr`` connection the register service writes (the TOML heredoc of its script)."""
    bodies = [tomllib.loads(b) for b in heredocs(shell_script(compose["services"]["register"]) or "")]
    configs = [b["superlink"] for b in bodies if "superlink" in b]
    assert len(configs) == 1, "register: expected one heredoc with a [superlink] config"
    name = configs[0]["default"]
    return {"name": name, **configs[0][name]}


def volume_mounts(service: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume entry."""
    out = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), f"use the short volume syntax: {entry}"
        parts = entry.split(":")
        assert len(parts) in (2, 3), f"volume '{entry}': want SOURCE:TARGET[:MODE]"
        out.append((parts[0], parts[1], parts[2] if len(parts) == 3 else "rw"))
    return out


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def networks(service: dict) -> set[str]:
    nets = service.get("networks", [] if "network_mode" in service else ["default"])
    return set(nets)


def depends(service: dict) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {d: STARTED for d in deps}
    return {d: (spec or {}).get("condition", STARTED) for d, spec in deps.items()}


def published_container_ports(service: dict) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def dockerfile_instructions(text: str) -> list[tuple[str, list[str]]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.split()))
    return out


def dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    if not path.is_file():
        return []
    return [ln.strip().rstrip("/") for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


@cache
def help_texts() -> dict[str, str]:
    """``--help`` of each Flower tool and each of our modules, run in parallel (once)."""
    bin_dir = Path(sys.executable).parent
    commands = {tool: [str(bin_dir / tool), "--help"] for tool in FLOWER_TOOLS}
    commands |= {mod: [sys.executable, "-m", mod, "--help"] for mod in OUR_MODULES}
    commands["flwr supernode register"] = [str(bin_dir / "flwr"), "supernode", "register", "--help"]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in commands.items()}
    texts = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"{name} --help failed:\n{out}"
        texts[name] = out
    return texts


# ----------------------------------------------------------------------------- checks

def check_services(compose: Compose) -> None:
    assert set(compose["services"]) == SERVICES


def check_one_image(compose: Compose) -> None:
    for name, svc in compose["services"].items():
        assert svc.get("image") == IMAGE, f"{name}: image {svc.get('image')!r}, want {IMAGE}"
        build = svc.get("build")
        assert isinstance(build, dict), f"{name}: no build section (fedhlm:latest is never pulled)"
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context {context} is not the repo root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE.resolve(), f"{name}: not docker/Dockerfile"
        assert svc.get("user") in (None, ""), f"{name}: overrides the image's non-root user"


def check_superlink_tls(compose: Compose) -> None:
    args = invocation(compose, "superlink", "flower-superlink")
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth"):
        assert flag in flags(args), f"superlink: {flag} missing"
    assert "--insecure" not in args
    assert option(args, "--host") == "0.0.0.0", "superlink: listens on loopback only inside its container"
    assert option(args, "--isolation") == "process", "superlink: the ServerApp runs in superexec-serverapp"


def check_superlink_port(compose: Compose) -> None:
    port = superlink_port(compose)
    services = compose["services"]
    assert published_container_ports(services["superlink"]) == {port}, "superlink: publish exactly its --port"
    for name, svc in services.items():
        if name != "superlink":
            assert not svc.get("ports"), f"{name}: publishes a port (only the SuperLink's is published)"
    dialled = {f"{name} --superlink": option(invocation(compose, name, "flower-supernode"), "--superlink")
               for name in SUPERNODES}
    dialled["superexec-serverapp"] = option(invocation(compose, "superexec-serverapp", "flower-superexec"),
                                            "--runtime-api-address")
    dialled["register config.toml"] = register_connection(compose)["address"]
    for who, address in dialled.items():
        assert host_port(address) == ("superlink", port), f"{who}: dials {address}, SuperLink is superlink:{port}"


def check_superlink_clients_use_tls(compose: Compose) -> None:
    ca = option(invocation(compose, "superlink", "flower-superlink"), "--ssl-ca-certfile")
    clients = {name: invocation(compose, name, "flower-supernode") for name in SUPERNODES}
    clients["superexec-serverapp"] = invocation(compose, "superexec-serverapp", "flower-superexec")
    for name, args in clients.items():
        assert "--insecure" not in args, f"{name}: --insecure towards the SuperLink"
        assert option(args, "--root-certificates") == ca, f"{name}: does not trust the SuperLink's CA"
    connection = register_connection(compose)
    assert not connection.get("insecure", False), "register: insecure connection"
    assert connection["root-certificates"] == ca, "register: does not trust the SuperLink's CA"


def check_supernode_keys(compose: Compose) -> None:
    keys = {name: option(invocation(compose, name, "flower-supernode"), "--auth-supernode-private-key")
            for name in SUPERNODES}
    for name, key in keys.items():
        assert key == f"/secrets/node-{name.rsplit('-', 1)[1]}", f"{name}: key {key}"
    assert len(set(keys.values())) == len(keys), f"SuperNodes share keys: {keys}"
    script = shell_script(compose["services"]["register"]) or ""
    registered = set(re.findall(r"(/secrets/node-\d+)\.pub\b", script))
    assert set(keys.values()) <= registered, f"keys not registered: {set(keys.values()) - registered}"
    calls = [args for prog, args in invocations(compose["services"]["register"]) if prog == "flwr supernode register"]
    assert calls, "register: no 'flwr supernode register'"
    connection = register_connection(compose)["name"]
    assert all(connection in args for args in calls), f"register: not using the connection '{connection}'"


def check_node_configs(compose: Compose) -> None:
    configs = {name: node_config(compose, name) for name in SUPERNODES}
    for name, cfg in configs.items():
        assert {"cluster-id", "partition-id", "num-partitions", "data-path"} <= set(cfg), f"{name}: {cfg}"
        for key in ("cluster-id", "partition-id", "num-partitions"):
            assert type(cfg[key]) is int, f"{name}: {key} = {cfg[key]!r} is not an int"
        assert isinstance(cfg["data-path"], str)
        assert cfg["num-partitions"] == len(SUPERNODES), f"{name}: num-partitions {cfg['num-partitions']}"
        assert cfg["data-path"] == f"/node-data/partition-{cfg['partition-id']}", f"{name}: {cfg['data-path']}"
    assert len({c["cluster-id"] for c in configs.values()}) == len(SUPERNODES), "cluster-ids are not distinct"
    assert sorted(c["partition-id"] for c in configs.values()) == list(range(len(SUPERNODES)))


def check_clientapp_superexecs(compose: Compose) -> None:
    services = compose["services"]
    for _i, (node, execer) in enumerate(zip(SUPERNODES, CLIENTAPP_EXECS)):
        node_args = invocation(compose, node, "flower-supernode")
        assert option(node_args, "--isolation") == "process", f"{node}: ClientApps run in {execer}"
        assert option(node_args, "--host") == "0.0.0.0", f"{node}: Runtime API unreachable from {execer}"
        address = option(invocation(compose, execer, "flower-superexec"), "--runtime-api-address")
        assert host_port(address) == (node, int(option(node_args, "--port"))), f"{execer}: dials {address}"
        shared = networks(services[node]) & networks(services[execer])
        assert shared, f"{execer} and {node} share no network"
        for other in SUPERNODES + ["superlink"]:
            if other != node:
                assert not networks(services[other]) & networks(services[execer]), \
                    f"{execer} shares a network with {other} (the node's Runtime API must stay private)"
        data_path = node_config(compose, node)["data-path"]
        mounts = {target: (source, mode) for source, target, mode in volume_mounts(services[execer])}
        assert any(data_path.startswith(t + "/") for t in mounts), f"{execer}: {data_path} is not mounted"


def check_volumes_and_networks(compose: Compose) -> None:
    declared_volumes = set(compose.get("volumes") or {})
    declared_networks = set(compose.get("networks") or {}) | {"default"}
    for name, svc in compose["services"].items():
        for source, target, mode in volume_mounts(svc):
            assert target.startswith("/"), f"{name}: mount target {target} is not absolute"
            assert mode in {"ro", "rw"}, f"{name}: mount mode {mode}"
            if is_bind(source):
                assert source.startswith("./"), f"{name}: bind source {source} is not relative to docker/"
                assert (COMPOSE.parent / source).resolve().is_relative_to(DOCKER), f"{name}: {source} leaves docker/"
            else:
                assert source in declared_volumes, f"{name}: volume '{source}' is not declared at top level"
        assert networks(svc) <= declared_networks, f"{name}: undeclared networks {networks(svc) - declared_networks}"


def check_depends_on(compose: Compose) -> None:
    services = compose["services"]
    want: dict[str, dict[str, str]] = {
        "superlink": {"credentials": DONE},
        "register": {"credentials": DONE, "superlink": STARTED},
        "superexec-serverapp": {"credentials": DONE, "superlink": STARTED, "oracle": STARTED},
        "oracle": {"credentials": DONE},
        **{node: {"register": DONE} for node in SUPERNODES},
        **{ex: {node: STARTED, "node-data": DONE} for node, ex in zip(SUPERNODES, CLIENTAPP_EXECS)},
    }
    for name, deps in want.items():
        got = depends(services[name])
        for dep, condition in deps.items():
            assert got.get(dep) == condition, f"{name}: depends_on {dep} is {got.get(dep)!r}, want {condition}"
    for name, svc in services.items():  # every dependency exists and nothing waits on itself
        assert set(depends(svc)) <= set(services) - {name}, f"{name}: bad depends_on {depends(svc)}"


def check_shell_scripts(compose: Compose) -> None:
    for name, svc in compose["services"].items():
        for part in raw_command(svc):
            bare = part.replace("$$", "")
            assert "$" not in bare, f"{name}: a single '$' in its command is compose interpolation; write '$$'"
        script = shell_script(svc)
        if script is not None:
            result = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
            assert result.returncode == 0, f"{name}: shell syntax error: {result.stderr}"
    creds = shell_script(compose["services"]["credentials"]) or ""
    assert re.search(r"if \[ -[ef] /secrets/ca\.crt \]", creds), "credentials: not idempotent (keep an existing CA)"


TOKEN = re.compile(r"^\$\{FEDHLM_ORACLE_TOKEN:\?[^}]+\}$")


def check_oracle(compose: Compose) -> None:
    services = compose["services"]
    oracle, server = services["oracle"], services["superexec-serverapp"]
    for name in ("oracle", "superexec-serverapp"):
        token = (services[name].get("environment") or {}).get("FEDHLM_ORACLE_TOKEN", "")
        assert TOKEN.match(str(token)), f"{name}: FEDHLM_ORACLE_TOKEN must be required: ${{FEDHLM_ORACLE_TOKEN:?...}}"
    args = invocation(compose, "oracle", "fedhlm_app.oracle.service")
    cert, key = option(args, "--tls-cert"), option(args, "--tls-key")
    assert (cert, key) == ("/secrets/server.pem", "/secrets/server.key"), "oracle: not the server certificate"
    assert "--no-token" not in args
    ca = option(invocation(compose, "superlink", "flower-superlink"), "--ssl-ca-certfile")
    assert server["environment"].get("SSL_CERT_FILE") == ca, "superexec-serverapp: SSL_CERT_FILE is not the CA"
    assert networks(oracle) & networks(server), "the oracle is unreachable from superexec-serverapp"

    url = urlsplit(tomllib.loads(RUN_CONFIG.read_text())["oracle-url"])
    assert url.scheme == "https" and url.hostname == "oracle", f"oracle-url {url.geturl()}: want https://oracle:..."
    assert url.port == int(option(args, "--port")), "oracle-url port is not the oracle's --port"
    hosts = option(invocation(compose, "credentials", "fedhlm_app.tools.deploy.credentials"), "--hosts").split(",")
    assert url.hostname in hosts, f"the server certificate is not valid for {url.hostname} ({hosts})"
    assert "superlink" in hosts, "the server certificate is not valid for superlink"


def check_run_config_matches(compose: Compose) -> None:
    from fedhlm_app.config import validate
    from fedhlm_app.tools.launch import merged_config

    cfg = validate(merged_config([str(RUN_CONFIG)], []))
    configs = [node_config(compose, name) for name in SUPERNODES]
    assert cfg.num_clients == len(SUPERNODES), "conf/docker.toml num-clients != number of SuperNodes"
    assert cfg.num_clusters == len({c["cluster-id"] for c in configs}), "num-clusters != distinct cluster-ids"
    assert cfg.oracle == "remote"
    node_data = invocation(compose, "node-data", "fedhlm_app.tools.deploy.node_data")
    assert int(option(node_data, "--num-partitions")) == len(SUPERNODES), "node-data: --num-partitions"
    assert (ROOT / option(node_data, "--run-config")).resolve() == RUN_CONFIG, "node-data: not conf/docker.toml"
    creds = invocation(compose, "credentials", "fedhlm_app.tools.deploy.credentials")
    assert int(option(creds, "--nodes")) == len(SUPERNODES), "credentials: --nodes"
    services = compose["services"]
    server_mounts = {t for _, t, mode in volume_mounts(services["superexec-serverapp"]) if mode == "rw"}
    assert cfg.results_dir in server_mounts, "results-dir is not a writable mount of superexec-serverapp"
    for execer in CLIENTAPP_EXECS:
        mounts = {t for _, t, mode in volume_mounts(services[execer]) if mode == "rw"}
        assert cfg.cache_dir in mounts, f"{execer}: cache-dir is not a writable mount"
    assert cfg.data_dir.startswith("/app/"), "data-dir must be inside the image"
    assert (ROOT / Path(cfg.data_dir).relative_to("/app")).is_dir(), f"{cfg.data_dir} is not in the image"


def check_flags_exist(compose: Compose) -> None:
    helps = help_texts()
    for name, svc in compose["services"].items():
        for program, args in invocations(svc):
            assert program in helps, f"{name}: runs '{program}', which this test cannot check"
            for flag in flags(args):
                assert re.search(rf"{re.escape(flag)}(?![\w-])", helps[program]), \
                    f"{name}: '{program}' has no {flag}"


# ----------------------------------------------------------------------------- tests

CHECKS = [check_services, check_one_image, check_superlink_tls, check_superlink_port,
          check_superlink_clients_use_tls, check_supernode_keys, check_node_configs, check_clientapp_superexecs,
          check_volumes_and_networks, check_depends_on, check_shell_scripts, check_oracle,
          check_run_config_matches, check_flags_exist]


@pytest.fixture(scope="module")
def compose() -> Compose:
    return load_compose()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_compose(compose, check):
    check(compose)


def test_dockerfile():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    assert instructions[:2] == [("ARG", ["BASE_IMAGE=python:3.11-slim"]), ("FROM", ["${BASE_IMAGE}"])]
    runs = " ".join(" ".join(args) for word, args in instructions if word == "RUN")
    assert "pip install --no-cache-dir --find-links /wheels -r requirements.txt" in runs
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1][0] not in {"root", "0"}, "the image must run as a non-root user"
    env = " ".join(" ".join(args) for word, args in instructions if word == "ENV")
    for setting in ("PYTHONPATH=/app", "HF_HUB_OFFLINE=1", "FLWR_TELEMETRY_ENABLED=0", "FLWR_DISABLE_UPDATE_CHECK=1"):
        assert setting in env, f"Dockerfile: ENV {setting} missing"
    assert ("WORKDIR", ["/app"]) in instructions
    requirements = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^flwr==1\.42\.", requirements, re.M), "requirements.txt no longer pins flwr 1.42"


def test_dockerfile_copy_sources_exist_and_are_not_ignored():
    ignored = dockerignore_patterns()
    copies = [args for word, args in dockerfile_instructions(DOCKERFILE.read_text()) if word in {"COPY", "ADD"}]
    assert copies
    for args in copies:
        assert not any(a.startswith("--from") for a in args)
        sources = [a for a in args if not a.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context (the repo root)"
            top = source.rstrip("/")
            assert not any(fnmatch.fnmatch(top, pat) or top.startswith(pat + "/") for pat in ignored), \
                f"COPY {source}: excluded by .dockerignore"
    for heavy in (".venv", "models", ".git"):
        assert any(fnmatch.fnmatch(heavy, pat) for pat in ignored), f".dockerignore: {heavy} is sent to the daemon"


def _set_arg(compose: Compose, name: str, flag: str, value: str | None) -> None:
    """Replace (or with None: drop) ``flag`` and its value in a service's exec-form command."""
    cmd = compose["services"][name]["command"]
    i = cmd.index(flag)
    if value is None:
        takes_value = i + 1 < len(cmd) and not cmd[i + 1].startswith("--")
        del cmd[i:i + 2 if takes_value else i + 1]
    else:
        cmd[i + 1] = value


BREAKAGES: dict[str, tuple[Callable[[Compose], None], Callable[[Compose], None]]] = {
    "shared key": (lambda c: _set_arg(c, "supernode-2", "--auth-supernode-private-key", "/secrets/node-1"),
                   check_supernode_keys),
    "no server certificate": (lambda c: _set_arg(c, "superlink", "--ssl-certfile", None), check_superlink_tls),
    "wrong port": (lambda c: _set_arg(c, "supernode-3", "--superlink", "superlink:9092"), check_superlink_port),
    "insecure supernode": (lambda c: c["services"]["supernode-0"]["command"].append("--insecure"),
                           check_superlink_clients_use_tls),
    "duplicate cluster": (lambda c: _set_arg(c, "supernode-1", "--node-config",
                                             'cluster-id=0 partition-id=1 num-partitions=4 data-path="/node-data/partition-1"'),
                          check_node_configs),
    "quoted int": (lambda c: _set_arg(c, "supernode-1", "--node-config",
                                      'cluster-id="1" partition-id=1 num-partitions=4 data-path="/node-data/partition-1"'),
                   check_node_configs),
    "wrong runtime address": (lambda c: _set_arg(c, "superexec-clientapp-1", "--runtime-api-address", "supernode-2:9094"),
                              check_clientapp_superexecs),
    "undeclared volume": (lambda c: c["volumes"].pop("cache-2"), check_volumes_and_networks),
    "early supernode": (lambda c: c["services"]["supernode-0"].pop("depends_on"), check_depends_on),
    "optional token": (lambda c: c["services"]["oracle"]["environment"].update(FEDHLM_ORACLE_TOKEN="${FEDHLM_ORACLE_TOKEN}"),
                       check_oracle),
    "unknown flag": (lambda c: c["services"]["supernode-0"]["command"].append("--no-such-flag"), check_flags_exist),
    "unescaped shell variable": (lambda c: c["services"]["register"]["command"].__setitem__(
        2, c["services"]["register"]["command"][2].replace("$$FLWR_HOME", "$FLWR_HOME")), check_shell_scripts),
    "pulled image": (lambda c: c["services"]["oracle"].update(image="python:3.11-slim"), check_one_image),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_checks_catch_broken_copies(compose, breakage):
    """A copy of the compose file with one thing broken fails the check that guards it."""
    breaks, check = BREAKAGES[breakage]
    broken = copy.deepcopy(compose)
    breaks(broken)
    with pytest.raises(AssertionError):
        check(broken)

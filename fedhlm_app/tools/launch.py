"""Launch a FedHLM simulation with ``flwr run`` on a self-managed local SuperLink.

    python -m fedhlm_app.tools.launch conf/paper.toml [-c "key=value ..."]

What it does, in order:

1. merges the run config (pyproject defaults < preset files < ``-c`` overrides),
   fills in absolute paths for data, results and the feature cache, and
   validates it, so a bad value stops here, before Ray or any model starts;
2. starts ``flower-superlink --simulation`` on a free loopback port with an
   isolated ``FLWR_HOME`` (Flower's own managed SuperLink would linger);
3. runs ``flwr run --stream`` with one SuperNode per configured client, on a
   staged copy of just the app's files: ``flwr run`` walks and resolves every
   file under the app folder before filtering, and in the project folder that
   includes the virtual environment (7 s of every launch);
4. checks the run status with ``flwr ls`` (``flwr run`` exits 0 even when the
   app failed) and exits non-zero unless it is ``finished:completed``.

Interrupted (Ctrl-C, SIGINT or SIGTERM), it stops the run (``flwr stop``), then the SuperLink and
every process under it (SuperExec, the simulation, Ray), and says how to resume: the checkpoint
of the last completed round stays valid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from fedhlm_app import paths
from fedhlm_app.config import ConfigError, RunConfig, validate
from fedhlm_app.data.datasets import DataError, hub_offline, load_local, resolve_data_dir
from fedhlm_app.data.partition import configured_partitions
from fedhlm_app.fl.tiers import Tiers
from fedhlm_app.oracle.base import OracleError, check_backend
from fedhlm_app.reporting.run_folder import RunFolder, RunFolderError
from fedhlm_app.slm.features import resolve_model_path

ROOT = Path(__file__).resolve().parents[2]


# One ``key=value`` pair of a ``-c`` string, as Flower's ``--run-config`` reads them: a quoted value
# may hold spaces.
OVERRIDE = re.compile(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)""")


def parse_overrides(text: str) -> dict[str, Any]:
    """The ``key=value`` pairs of one ``-c`` string (TOML values; quote strings); anything else is an error."""
    leftover = OVERRIDE.sub("", text).strip()
    if leftover:
        raise ConfigError(f"override '{text}': cannot read '{leftover}' (write key=value pairs; quote strings: key='a b')")
    values = {}
    for key, value in OVERRIDE.findall(text):
        try:
            values.update(tomllib.loads(f"{key} = {value}"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"override '{key}={value}' is not TOML 'key=value' ({exc}); quote strings: key='text'") from exc
    return values


def merged_config(presets: list[str], overrides: list[str]) -> dict[str, Any]:
    """pyproject defaults, then each preset file, then each ``k=v`` override string."""
    cfg = dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    for preset in presets:
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"run-config file '{preset}' not found")
        cfg.update(tomllib.loads(path.read_text()))
    for text in overrides:
        cfg.update(parse_overrides(text))
    return cfg


def with_default_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    """The data, cache and results folders as absolute paths, by the rules of ``fedhlm_app.paths``,
    resolved here (the ServerApp runs in the SuperLink's cwd, the ClientApps in Ray workers)."""
    data = paths.data_dir(cfg["data-dir"])
    return {**cfg, "data-dir": str(data or ""), "results-dir": str(paths.results_dir(cfg["results-dir"])),
            "cache-dir": str(paths.cache_dir(cfg["cache-dir"]))}


def resolved_config(presets: list[str], overrides: list[str]) -> RunConfig:
    """pyproject defaults < presets < overrides, with absolute paths, validated."""
    return validate(with_default_paths(merged_config(presets, overrides)))


def check_everything(cfg: RunConfig) -> None:
    """What can fail before training, checked now: the strategies, the data, the SLM, the oracle, the folders."""
    Tiers.of(cfg)
    check_local_data(cfg)
    check_model(cfg)
    try:
        check_backend(cfg)
    except OracleError as exc:
        raise ConfigError(f"oracle '{cfg.oracle}': {exc}") from None
    check_folders(cfg)


def check_local_data(cfg: RunConfig) -> None:
    """Read the local CSVs and partition them once, so a broken dataset or an impossible
    partition (``min-partition-size``) fails before Ray starts, not in every client. With
    ``data-source = "auto"`` the local folder is checked too whenever there is one: the Hub
    may not answer, and then it is what the run reads."""
    local_folder = paths.data_dir(cfg.data_dir)
    if cfg.data_source == "local" or (cfg.data_source == "auto" and (hub_offline() or local_folder is not None)):
        ds = load_local(resolve_data_dir(cfg.data_dir), cfg.train_file, cfg.test_file)
        ds = ds.truncated(cfg.max_train_items, cfg.max_test_items, cfg.seed)
        try:
            configured_partitions(ds.train.labels, ds.test.labels, cfg.num_clients, cfg)
        except ValueError as exc:
            raise DataError(str(exc)) from exc


def check_model(cfg: RunConfig) -> None:
    """The SLM exists (and has the layers fine-tuning asks for) before Ray starts."""
    try:
        path = Path(resolve_model_path(cfg.slm_model))
    except FileNotFoundError as exc:  # a packaged model whose wheels are missing
        raise ConfigError(str(exc)) from exc
    looks_like_a_path = cfg.slm_model.startswith(("/", ".", "~")) or Path(cfg.slm_model).expanduser().exists()
    if not path.is_dir() and (looks_like_a_path or hub_offline()):
        raise ConfigError(f"slm-model '{cfg.slm_model}': no such folder" + ("" if looks_like_a_path else
                          " (and the Hugging Face Hub is offline: 'minilm', 'mpnet' or a local checkpoint folder)"))
    config_file = path / "config.json"
    if cfg.encoder_rounds and config_file.is_file():
        layers = int(json.loads(config_file.read_text()).get("num_hidden_layers", 0))
        if cfg.encoder_layers > layers:
            raise ConfigError(f"encoder-layers = {cfg.encoder_layers}, but '{cfg.slm_model}' has {layers} layers")


def check_folders(cfg: RunConfig) -> None:
    """The results and cache folders are writable, and the run's folder may be used (``RunFolder``)."""
    for what, folder in (("results-dir", paths.results_dir(cfg.results_dir)), ("cache-dir", paths.cache_dir(cfg.cache_dir))):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise ConfigError(f"{what} '{folder}' is not writable: {exc.strerror or exc}") from None
    run_folder = RunFolder.of(cfg)
    run_folder.check_start(cfg)
    run_folder.check_unlocked()


# examples/: strategies of your own, importable by path (edge-strategy = "examples.module:Class")
APP_FILES = ("pyproject.toml", "server_app.py", "client_app.py", "fedhlm_app/**/*.py", "examples/**/*.py")


def stage_app(dest: Path) -> Path:
    """A fresh copy of what the Flower App Bundle needs (code and pyproject), in ``dest``."""
    shutil.rmtree(dest, ignore_errors=True)
    for pattern in APP_FILES:
        for src in ROOT.glob(pattern):
            (dest / src.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / src.relative_to(ROOT))
    return dest


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_bin(name: str) -> str:
    """A Flower command of this environment (its bin folder), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float) and v == float("inf"):
        return "inf"
    return repr(v)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of Flower processes: an isolated home, no phoning home, no runtime installs."""
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # The SuperLink and SuperNodes spawn flower-superexec, flwr-serverapp, flwr-clientapp from PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None = None) -> None:
    """``$FLWR_HOME/config.toml`` with one default SuperLink connection (insecure without a CA)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n'
    )


def wait_healthy(url: str, proc: subprocess.Popen, what: str, log_path: Path, timeout: float = 60.0,
                 context: ssl.SSLContext | None = None) -> None:
    """Poll ``url`` until it answers; fail early when ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1, context=context)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start; see {log_path}") from None
            time.sleep(0.2)


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Terminate ``proc`` and every process under it (SIGTERM), then kill what is left after ``grace``
    seconds. The tree is read first: Ray's and Flower's processes outlive a parent that is gone."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=grace)
    proc.poll()


class Interrupted(KeyboardInterrupt):
    """The launcher got SIGINT or SIGTERM."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def stop_running_runs(env: dict[str, str]) -> None:
    """``flwr stop`` every run the SuperLink still has pending or running."""
    listing = subprocess.run([flower_bin("flwr"), "ls", "--format", "json"], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=30)
    for run in json.loads(listing.stdout or "{}").get("runs", []):
        if not str(run.get("status", "")).startswith("finished"):
            subprocess.run([flower_bin("flwr"), "stop", str(run["run-id"])], env=env, cwd=ROOT, capture_output=True, timeout=30)
            print(f"fedhlm: stopped run {run['run-id']}", flush=True)


def run_app(cfg: RunConfig, app_dir: Path, connection: str, env: dict[str, str], extra: list[str] = ()) -> str:
    """``flwr run --stream`` the staged app with exactly ``cfg``; return the run's final status.

    ``flwr run`` exits 0 even when the app failed, so the status comes from ``flwr ls``.
    """
    # Every key is passed explicitly, so what runs is exactly the validated, merged config; as a TOML
    # file, so no value is split or unquoted on the way.
    config_file = app_dir.parent / "run-config.toml"
    config_file.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in cfg.as_dict().items()))
    cmd = [flower_bin("flwr"), "run", str(stage_app(app_dir)), connection, "--stream", "--run-config", str(config_file), *extra]
    run_started = time.monotonic()
    subprocess.run(cmd, env=env, cwd=ROOT, check=False)
    print(f"fedhlm: flwr run returned after {time.monotonic() - run_started:.1f} s", flush=True)
    listing = subprocess.run([flower_bin("flwr"), "ls", "--format", "json"], env=env, cwd=ROOT, capture_output=True, text=True)
    runs = json.loads(listing.stdout or "{}").get("runs", [])
    return str(runs[-1]["status"]) if runs else "unknown"


def run_simulation(cfg: RunConfig, flwr_home: Path, cpus_per_client: int) -> str:
    """Run the app on a fresh local SuperLink; return the final run status."""
    port = free_port()
    write_connection(flwr_home, "fedhlm-sim", f"127.0.0.1:{port}")
    env = flower_env(flwr_home)
    log_path = flwr_home / "superlink.log"
    started = time.monotonic()
    with open(log_path, "w") as log_file:
        superlink = subprocess.Popen(
            [flower_bin("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the launcher only: it stops the run and the tree in order
        )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", superlink, "SuperLink", log_path)
        print(f"fedhlm: SuperLink ready in {time.monotonic() - started:.1f} s", flush=True)
        simulation = f"num-supernodes={cfg.num_clients} client-resources-num-cpus={cpus_per_client}"
        return run_app(cfg, flwr_home / "app", "fedhlm-sim", env, ["--federation-config", simulation])
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):  # best effort: the SuperLink's tree is stopped below in any case
            stop_running_runs(env)
        raise
    finally:
        stopping = time.monotonic()
        stop(superlink, grace=5.0)  # Ray's agents may ignore SIGTERM: they are killed after the grace
        print(f"fedhlm: SuperLink stopped in {time.monotonic() - stopping:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("presets", nargs="*", help="run-config TOML files (conf/*.toml)")
    parser.add_argument("-c", "--run-config", action="append", default=[], help="overrides: \"key=value key2='text'\"")
    parser.add_argument("--flwr-home", default=str(ROOT / ".flwr_home"), help="isolated Flower home (default: .flwr_home)")
    parser.add_argument("--cpus-per-client", type=int, default=1, help="Ray CPUs per ClientApp actor")
    parser.add_argument("--check-only", action="store_true", help="validate the config and data, then exit")
    args = parser.parse_args(argv)
    try:
        cfg = resolved_config(args.presets, args.run_config)
        cfg = cfg.replace(run_name=cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))  # named now: the resume hint needs it
        check_everything(cfg)
    except (ConfigError, DataError, RunFolderError) as exc:
        print(f"fedhlm: {exc}", file=sys.stderr)
        return 2
    if args.check_only:
        print("fedhlm: config, data, models, oracle and folders OK")
        return 0
    # SIGINT too, explicitly: a process started as a background job (`cmd &` in a script, as CI runners
    # do) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler of its own.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupted)
    try:
        status = run_simulation(cfg, Path(args.flwr_home).resolve(), args.cpus_per_client)
    except KeyboardInterrupt as exc:
        signum = signal.Signals[exc.args[0]] if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"fedhlm: interrupted ({signum.name}); the run and its processes were stopped. The checkpoint of the last "
              f"completed round is {RunFolder.of(cfg).checkpoint}: continue with -c \"run-name='{cfg.run_name}' resume=true\"",
              file=sys.stderr, flush=True)
        return 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    print(f"fedhlm: run status {status}")
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())

"""fedhlm: the ServerApp (edge servers and cloud). It runs the phases in order and writes the report.

The phases (``phases``) say who is sent what; the run's shared state and its checkpoint
live in ``run_state``; every message is counted in the communication ledger by the
exchange (``exchange``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from logging import INFO

import numpy as np
from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedhlm_app.app import checkpoint, phases
from fedhlm_app.app.exchange import Exchange
from fedhlm_app.app.run_state import Run
from fedhlm_app.config import RunConfig, validate
from fedhlm_app.fl.simulation_dispatch import index_undelivered
from fedhlm_app.fl.tiers import Tiers
from fedhlm_app.oracle.base import make_oracle
from fedhlm_app.reporting.ledger import Ledger
from fedhlm_app.reporting.results import RunOutcome, write_report
from fedhlm_app.reporting.run_folder import RunFolder
from fedhlm_app.routing.p2p import PeerCoordinator
from fedhlm_app.slm.local_data import dataset

app = ServerApp()


@contextmanager
def stopwatch(timings: dict[str, float], name: str) -> Iterator[None]:
    """Time the block into ``timings[name]`` (seconds)."""
    started = time.monotonic()
    yield
    timings[name] = time.monotonic() - started


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedHLM end to end (or on from its checkpoint) and write the report."""
    started, started_epoch = time.monotonic(), time.time()  # the epoch lets bench/ place the app in a launch
    cfg = validate(context.run_config)  # fail fast, before anything loads
    if index_undelivered(grid):  # a simulation: its engine hands out messages in linear time
        log(INFO, "simulation: message dispatch indexed per node (fedhlm_app/fl/simulation_dispatch.py)")
    tiers = Tiers.of(cfg)  # imports a strategy given by path and tries its arguments
    np.random.seed(cfg.seed)  # Flower's DP wrappers draw their noise from numpy's global generator
    cfg = cfg.replace(run_name=cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))  # fixed now: the checkpoint lives there
    folder = RunFolder.of(cfg)
    log(INFO, "run '%s': results in %s", cfg.run_name, folder.path)
    folder.check_start(cfg)
    with folder.locked():
        outcome = run(grid, cfg, tiers, folder, started, started_epoch)
    write_report(outcome)
    if cfg.oracle_required and outcome.oracle_never_answered:
        raise RuntimeError(f"the oracle ({cfg.oracle}) never answered: every result is the SLM's (see {folder.path / 'summary.md'}); "
                           "oracle-required = false accepts such a run")


def run(grid: Grid, cfg: RunConfig, tiers: Tiers, folder: RunFolder, started: float, started_epoch: float) -> RunOutcome:
    """The phases in order, from the checkpoint in ``folder`` when resuming."""
    progress = checkpoint.load(folder.checkpoint, cfg) if cfg.resuming else None
    if cfg.resuming:
        log(INFO, "resume: %s", f"from encoder round {progress.encoder.done}, head round {progress.head.done}, "
            f"threshold round {progress.threshold_done}"
            if progress else f"no checkpoint at {folder.checkpoint} (resume = auto), starting from the beginning")
    data = dataset(cfg)  # fails fast on missing/malformed data
    oracle = make_oracle(cfg, data)  # loads its model (or checks its server) before clients featurize
    # a resumed run books its traffic on top of what the crashed one had sent
    ledger = progress.server["ledger"] if progress and progress.server else Ledger()
    exchange = Exchange(grid, ledger, cfg.round_timeout, min_active=cfg.min_active_clients)
    timings: dict[str, float] = {}
    try:
        with stopwatch(timings, "setup"):
            info = phases.setup(exchange, grid, cfg)
            cluster_of = {n: i.cluster_id for n, i in info.items()}
            peers = PeerCoordinator(cfg.p2p_neighbours, cfg.p2p_neighbour_k, cfg.p2p_max_error, cfg.peer_costs, cfg.p2p_beat_threshold) if cfg.p2p else None
            aggregator = tiers.aggregator(cluster_of, cfg.min_cluster_clients, {n: i.partition_id for n, i in info.items()})
            state = Run(cfg, exchange, oracle, info, aggregator, peers, progress or checkpoint.Progress(), folder.checkpoint)
            state.restore_server_state()
            state.aggregator.summary()
            log(INFO, "setup: %d clients in clusters %s", len(info), sorted(set(cluster_of.values())))
        if cfg.encoder_rounds:
            with stopwatch(timings, "encoder"):
                phases.encoder_phase(state, data.num_classes)
        with stopwatch(timings, "head"):
            phases.head_phase(state)
            phases.install_head(state)
        with stopwatch(timings, "threshold"):
            phases.threshold_phase(state)
        with stopwatch(timings, "inference"):
            evaluation = phases.inference_phase(state)
    finally:
        oracle.close()
    return RunOutcome(
        cfg=cfg, dataset_source=data.source, class_names=data.class_names, info=state.info, evaluation=evaluation,
        progress=state.progress, ledger=state.ledger, failures=exchange.failures, dropped=exchange.dropped,
        rejected=state.aggregator.rejected, oracle_failures=state.oracle_failures, peers=state.peers,
        pooled_label_counts=state.pooled_label_counts, timings={**timings, "total": time.monotonic() - started},
        started_epoch=started_epoch,
    )

"""A run's results folder: never silently overwritten, held by one run at a time.

``results-dir/<run-name>/`` holds a run's results and its checkpoint. A run may start there only
when the folder holds no earlier run, or when it resumes that run (``resume``) or replaces it
(``overwrite``); ``resume = true`` needs the checkpoint to exist (``auto`` starts over without
one). While a run writes the folder it holds an exclusive lock on ``.lock`` inside it (released by
the operating system when the process ends, however it ends), so a second run of the same name,
say a resume started while the first is still going, is refused instead of writing the same files.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedhlm_app.app.checkpoint import CHECKPOINT_FILE
from fedhlm_app.config import RunConfig
from fedhlm_app.paths import results_dir

RESULTS_FILE = "results.json"
LOCK_FILE = ".lock"


class RunFolderError(RuntimeError):
    """The run may not use this folder; the message says why and what to do."""


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @staticmethod
    def of(cfg: RunConfig) -> RunFolder:
        return RunFolder(results_dir(cfg.results_dir) / cfg.run_name)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE

    def holds_a_run(self) -> bool:
        return (self.path / RESULTS_FILE).is_file() or self.checkpoint.is_file()

    def check_start(self, cfg: RunConfig) -> None:
        """Refuse to start a run that would overwrite another's results, or resume nothing."""
        name = f"run-name '{cfg.run_name}'"
        if cfg.resume == "true" and not self.checkpoint.is_file():
            raise RunFolderError(f"resume = true, but {name} has no checkpoint at {self.checkpoint} "
                                 "(check the run-name; resume = 'auto' starts over when there is none)")
        if self.holds_a_run() and not (cfg.resuming or cfg.overwrite):
            raise RunFolderError(f"{name} already holds a run in {self.path}: choose another run-name, continue it with "
                                 "resume = true, or replace it with overwrite = true")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder for this process (refused with a message while another process holds it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise RunFolderError(f"{self.path} is in use by another run ({holder}); wait for it to end or stop it") from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
            fh.flush()
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def check_unlocked(self) -> None:
        """Fail now if another process holds the folder (the launcher's early check)."""
        if self.path.is_dir():
            with self.locked():
                pass

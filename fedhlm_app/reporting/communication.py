"""What a run's communication costs and when it pays for itself, from the ledger.

Training moves models, thresholds, the LLM's verdicts and (with P2P) prototypes once; inference then
moves, per query, the escalated items to the LLM and its answers back. Cloud-only needs no
training but sends every query. Each policy is charged the training it needs to exist:

- FedHLM: everything before inference (setup, encoder, head, threshold rounds with their LLM
  traffic, and P2P's prototypes, held-out evidence and certified thresholds); without P2P, all of it
  but P2P's;
- SLM only and the static threshold: setup and the SLM's training (encoder and head);
- cloud only: nothing.

``break_even_queries``: how many queries a policy must answer before its total bytes (training
included) fall below cloud-only's, assuming future queries escalate at the rate measured on the
test queries: training / (cloud-only bytes per query - the policy's bytes per query), rounded up;
None when the policy does not send fewer bytes per query than cloud-only.
"""

from __future__ import annotations

import math
from typing import Any

from fedhlm_app.reporting.ledger import Ledger

TRAINING_PHASES = ("setup", "encoder", "head", "threshold", "p2p")
PHASES_NEEDED = {
    "fedhlm": TRAINING_PHASES,
    "fedhlm_no_p2p": ("setup", "encoder", "head", "threshold"),
    "slm_only": ("setup", "encoder", "head"),
    "static_threshold": ("setup", "encoder", "head"),
    "cloud_only": (),
}
LLM_LINKS = ("client->llm", "llm->client")


def inference_bytes(ledger: Ledger, policy: str) -> int:
    """Bytes of a policy's queries to and from the LLM at inference."""
    return sum(ledger.total(f"inference:{policy}", link) for link in LLM_LINKS)


def break_even(training: int, per_query: float, cloud_per_query: float) -> int | None:
    if per_query >= cloud_per_query:
        return None
    return math.ceil(training / (cloud_per_query - per_query))


def communication(ledger: Ledger, queries: int, policies: list[str]) -> dict[str, Any]:
    """``results.json``'s ``communication`` block: bytes per phase and link, and per policy its training,
    inference and total bytes, bytes per query and break-even point against cloud-only."""
    by_phase = {phase: ledger.total(phase) for phase in TRAINING_PHASES}
    cloud_per_query = inference_bytes(ledger, "cloud_only") / max(queries, 1)
    per_policy = {}
    for name in policies:
        training = sum(by_phase[p] for p in PHASES_NEEDED.get(name, TRAINING_PHASES))
        inference = inference_bytes(ledger, name)
        per_query = inference / max(queries, 1)
        per_policy[name] = {
            "training_bytes": training, "inference_bytes": inference, "total_bytes": training + inference,
            "bytes_per_query": per_query,
            "break_even_queries": None if name == "cloud_only" else break_even(training, per_query, cloud_per_query),
        }
    return {
        "by_phase_and_link": ledger.to_dict(),
        "training_bytes_by_phase": by_phase,
        "training_bytes": sum(by_phase.values()),
        "training_llm_bytes": sum(ledger.total("threshold", link) for link in LLM_LINKS),
        "inference_llm_bytes": {name: ledger.total(f"inference:{name}", "client->llm") for name in policies},
        "p2p_bytes": by_phase["p2p"],
        "policies": per_policy,
        "break_even_queries": per_policy.get("fedhlm", {}).get("break_even_queries"),
        "queries": queries,
    }

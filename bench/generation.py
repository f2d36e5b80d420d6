"""Token-level hybrid decoding with a real LLM: every transmission policy on the same prompts.

    python bench/generation.py [--model smollm2] [--layers 28] [--prompts 16] [--calibration 16] [--new-tokens 24] [--mode greedy]

The drafter is the LLM's first ``--layers`` layers with its final norm and head
(``fedhlm_app.generation.models.EarlyExitPair``); both are read from one forward pass per step,
so the numbers are about which tokens travel, not about speed (``bench/drafter.py`` measures the
drafter's speed). Prompts are AG News test titles; the thresholds are fitted on the continuations
of AG News train titles (calibration), every token of which the LLM verified:

- FedHLM's rule: tau learned with the app's loss and hyper-parameters (lambda, kappa, learning
  rate, local steps, rounds, exploration band, from tau-init) on the calibration tokens, as one
  client: the federated version (many clients, edge and cloud aggregation) is not built yet;
- U-HLM's rule: its own uncertainty (temperature perturbation) and its fitted tau = -b/a;
  and U-HLM's uncertainty at FedHLM's transmission rate;
- a random skip at FedHLM's rate, an oracle skip (exactly the tokens the LLM would reject), the
  drafter alone, and always-verify (standard speculative decoding), whose output is the LLM's own
  (greedy: the same tokens; sampled: the same distribution).

Greedy mode: fidelity is the share of tokens equal to the LLM's own greedy continuation at the same
position, per-token agreement the share equal to the LLM's argmax given the hybrid's own prefix;
sampled mode: the mean total variation between the distribution each token was drawn from and the
LLM's. Both: the LLM's perplexity of the text. Writes bench/results/generation.json.
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
from drafter import ag_news  # noqa: E402

from fedhlm_app.config import validate  # noqa: E402
from fedhlm_app.generation import policies  # noqa: E402
from fedhlm_app.generation.models import EarlyExitPair  # noqa: E402
from fedhlm_app.generation.tokens import decode, metrics  # noqa: E402
from fedhlm_app.reporting.evaluation import uhlm_threshold  # noqa: E402
from fedhlm_app.routing.threshold import ThresholdConfig, exploration_mask, local_update  # noqa: E402
from fedhlm_app.slm.uncertainty import margin, temperature_perturbation  # noqa: E402
from fedhlm_app.tools.launch import merged_config  # noqa: E402


def learn_threshold(h: np.ndarray, beta: np.ndarray) -> float:
    """The app's threshold rounds (its defaults in pyproject.toml) for one client: feedback only on
    the tokens sent (above tau minus the exploration band), remembered across rounds; the loss is
    normalised by all tokens."""
    app = validate(merged_config([], []))
    cfg = ThresholdConfig(kappa=app.kappa, lam=app.lambda_, lr=app.threshold_lr, local_steps=app.threshold_local_steps)
    tau, known = app.tau_init, np.zeros(len(h), bool)
    for _ in range(app.threshold_rounds):
        known |= exploration_mask(h, tau, app.exploration_band)
        tau = local_update(tau, h[known], beta[known], cfg, len(h))
    return tau


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layers", type=int, default=28, help="the drafter: the LLM's first layers")
    parser.add_argument("--prompts", type=int, default=16, help="AG News test titles to continue")
    parser.add_argument("--calibration", type=int, default=16, help="AG News train titles the thresholds are fitted on")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--top-k", type=int, default=8, help="draft probabilities sent with a transmitted token")
    parser.add_argument("--mode", choices=("greedy", "sampled"), default="greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "generation.json"))
    args = parser.parse_args()
    pair = EarlyExitPair(args.model, args.layers)
    encode = lambda rows: [pair.tokenizer(row[1]).input_ids for row in rows]  # noqa: E731
    prompts, calibration = encode(ag_news("test", args.prompts)), encode(ag_news("train", args.calibration))
    greedy = args.mode == "greedy"

    def run(transmit, items, measure=margin, seed=args.seed):
        started = time.perf_counter()
        out, trace = decode(items, pair, transmit, measure, args.new_tokens, args.top_k, greedy, np.random.default_rng(seed))
        return out, trace, time.perf_counter() - started

    _, cal, _ = run(policies.always(), calibration)
    h_cal, beta_cal = np.asarray(cal.uncertainty), np.asarray(cal.beta)
    tau = learn_threshold(h_cal, beta_cal)
    _, cal_uhlm, _ = run(policies.always(), calibration, temperature_perturbation)
    tau_uhlm, a, b = uhlm_threshold(np.asarray(cal_uhlm.uncertainty), np.asarray(cal_uhlm.beta))
    print(f"bench/generation.py: {len(cal.beta)} calibration tokens, LLM rejects {beta_cal.mean():.3f} of the drafts; "
          f"FedHLM tau {tau:.3f}, U-HLM tau {tau_uhlm:.3f} (beta = {a:.3f} u + {b:.3f})", flush=True)

    reference, _, _ = run(policies.always(), prompts) if greedy else (None, None, None)
    rows: dict[str, dict[str, float]] = {}

    def measure(name, transmit, uncertainty=margin):
        out, trace, seconds = run(transmit, prompts, uncertainty)
        rows[name] = {**metrics(trace, out, reference), "seconds": seconds}
        print(f"  {name}: {json.dumps({k: round(v, 4) for k, v in rows[name].items()})}", flush=True)
        return rows[name]

    ours = measure(f"FedHLM rule, tau {tau:.3f} (margin)", policies.above(tau))
    rate = ours["transmitted_share"]
    measure(f"U-HLM rule, tau {tau_uhlm:.3f} (temperature perturbation)", policies.above(tau_uhlm), temperature_perturbation)
    h_uhlm = np.asarray(run(policies.never(), prompts, temperature_perturbation)[1].uncertainty)
    at_rate = float(np.quantile(h_uhlm, 1 - rate)) if rate > 0 else 1.0
    measure(f"U-HLM uncertainty at FedHLM's rate (tau {at_rate:.3f})", policies.above(at_rate), temperature_perturbation)
    measure("random skip at FedHLM's rate", policies.at_random(rate, np.random.default_rng(args.seed + 1)))
    measure("oracle skip", policies.oracle())
    measure("drafter only", policies.never())
    measure("always verify", policies.always())

    print(f"\n{args.prompts} AG News test titles x {args.new_tokens} tokens, {args.mode}; drafter: first {args.layers} layers of "
          f"{args.model}; top-{args.top_k} drafts:\n")
    quality = "fidelity | per-token agreement" if greedy else "mean total variation to the LLM"
    print(f"| policy | transmitted | {quality} | rejection rate of sent tokens | LLM perplexity | uplink draft bytes |")
    print("|---|---|---|---|---|---|" + ("---|" if greedy else ""))
    for name, r in rows.items():
        # greedy: a kept token's total variation to the LLM is 1 where it is not the LLM's argmax, else 0
        values = f"{r['greedy_fidelity']:.3f} | {1 - r['mean_tv_to_llm']:.3f}" if greedy else f"{r['mean_tv_to_llm']:.3f}"
        print(f"| {name} | {r['transmitted_share']:.3f} | {values} | {r['rejection_rate']:.3f} | {r['llm_perplexity']:.2f} | "
              f"{r['uplink_draft_bytes']:,.0f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "tau": tau, "tau_uhlm": tau_uhlm, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

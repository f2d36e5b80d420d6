"""Token-level hybrid decoding, the pure part (numpy; no Flower, no torch).

At every step a drafter on the device proposes the next token of each sequence from its
distribution p. Where the token's uncertainty is above the device's threshold, it travels to the LLM
with p compressed to its ``k`` most probable tokens (``TopK``); the LLM verifies it with the
speculative rule of ``fedhlm_app.routing.speculative`` and returns the final token and the rejection
probability beta, the feedback thresholds learn from exactly as for classification (same loss,
same aggregation). Elsewhere the drafted token stands.

Two decoding modes:

- **sampled**: the drafter samples its token from the top-k distribution it would send, so the
  rule (accept with min(1, q_d / p_d), else resample from norm(max(0, q - p))) is exact: a verified
  token is distributed as the LLM's q, whatever p is (``tests/test_generation.py`` checks it).
- **greedy**: the drafter proposes argmax p and the LLM keeps it when it is argmax q, else replaces
  it by argmax q. This is the same rule on point masses, so beta = 1 when the LLM disagrees, else 0.

``decode`` runs a batch of sequences under a transmission policy (``Transmit``) and records per
token what every metric needs (``Trace``); ``metrics`` turns a trace into the report's numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedhlm_app.routing.speculative import Verdict, rejection_of

TOKEN_ID_BYTES = 4  # int32 token ids on the wire
PROB_BYTES = 2  # float16 probabilities on the wire


@dataclass(frozen=True)
class TopK:
    """Draft distributions compressed to their ``k`` most probable tokens, as they travel.

    ``probs`` are the float16 values that travel, renormalized: the drafter samples from exactly
    this distribution and the LLM verifies against it, so compression never biases the rule.
    """

    ids: np.ndarray  # (n, k) token ids, most probable first
    probs: np.ndarray  # (n, k) float64, each row sums to 1

    @classmethod
    def of(cls, p: np.ndarray, k: int) -> TopK:
        p = np.asarray(p, dtype=np.float64)
        if p.ndim != 2 or not 1 <= k <= p.shape[1]:
            raise ValueError(f"top-{k} of distributions of shape {p.shape}")
        ids = np.argpartition(-p, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(p, ids, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        ids, top = np.take_along_axis(ids, order, axis=1), np.take_along_axis(top, order, axis=1)
        sent = (top / top.sum(axis=1, keepdims=True)).astype(np.float16).astype(np.float64)
        return cls(ids.astype(np.int64), sent / sent.sum(axis=1, keepdims=True))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: a token id and a float16 probability per kept token."""
        return self.ids.size * (TOKEN_ID_BYTES + PROB_BYTES)

    def prob_of(self, tokens: np.ndarray) -> np.ndarray:
        """p of each row's token (0 where it is not among the row's k)."""
        hits = self.ids == np.asarray(tokens)[:, None]
        return np.where(hits, self.probs, 0.0).sum(axis=1)

    def dense(self, vocab: int) -> np.ndarray:
        out = np.zeros((len(self), vocab))
        np.put_along_axis(out, self.ids, self.probs, axis=1)
        return out

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One token per row, drawn from the row's distribution."""
        picks = (rng.random(len(self))[:, None] > np.cumsum(self.probs, axis=1)).sum(axis=1)
        return self.ids[np.arange(len(self)), np.minimum(picks, self.ids.shape[1] - 1)]


def verify_sampled(draft: TopK, q: np.ndarray, tokens: np.ndarray, rng: np.random.Generator) -> Verdict:
    """The speculative rule for sampled drafts: accept with min(1, q_d / p_d), else resample from
    norm(max(0, q - p)). ``q`` is the LLM's dense next-token distribution, (n, vocab)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    q = np.asarray(q, dtype=np.float64)
    beta = rejection_of(draft.prob_of(tokens), q[np.arange(len(tokens)), tokens])
    accepted = rng.random(len(tokens)) >= beta
    final = tokens.copy()
    for i in np.flatnonzero(~accepted):
        # p differs from 0 only at the row's k tokens, so only they change in q - p
        residual = q[i].copy()
        residual[draft.ids[i]] = np.maximum(residual[draft.ids[i]] - draft.probs[i], 0.0)
        final[i] = rng.choice(len(residual), p=residual / residual.sum())
    return Verdict(beta=beta, accepted=accepted, final=final)


def verify_greedy(q: np.ndarray, tokens: np.ndarray) -> Verdict:
    """The rule on point masses: keep the draft where it is the LLM's argmax, else take the argmax."""
    best = np.asarray(q).argmax(axis=1)
    accepted = np.asarray(tokens) == best
    return Verdict(beta=(~accepted).astype(np.float64), accepted=accepted, final=best)


# A step's next-token distributions for a batch of token-id sequences, the drafter's p and the LLM's
# q: each (n, vocab), rows summing to 1
NextTokens = Callable[[list[list[int]]], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Step:
    """What a transmission policy sees at one step (the LLM's q only for the oracle policy)."""

    uncertainty: np.ndarray  # (n,) of the drafter's distribution
    drafts: np.ndarray  # (n,) the drafted tokens
    llm_rejects: np.ndarray  # (n,) bool: would the LLM reject the draft (greedy: disagree); only the oracle may look


Transmit = Callable[[Step], np.ndarray]  # (n,) bool: which drafted tokens go to the LLM


@dataclass
class Trace:
    """Per generated token (step by step, each step's sequences in order), what the metrics need."""

    uncertainty: list[float]
    transmitted: list[bool]
    beta: list[float]  # the LLM's rejection probability of the draft (computed for every token)
    rejected: list[bool]  # the LLM replaced the draft (transmitted tokens only)
    tv: list[float]  # total variation between what the hybrid drew the token from and the LLM's q
    llm_logprob: list[float]  # log q of the token the hybrid emitted
    draft_bytes: list[int]

    @classmethod
    def empty(cls) -> Trace:
        return cls([], [], [], [], [], [], [])


def decode(prompts: list[list[int]], models: NextTokens, transmit: Transmit, uncertainty: Callable[[np.ndarray], np.ndarray],
           new_tokens: int, k: int, greedy: bool, rng: np.random.Generator) -> tuple[list[list[int]], Trace]:
    """Continue every prompt by ``new_tokens`` tokens under the policy ``transmit``.

    The LLM's q is computed at every step so the trace can report fidelity and total variation
    for every token; only transmitted tokens use it to change the output. Returns the continuations
    and the trace.
    """
    sequences = [list(p) for p in prompts]
    trace = Trace.empty()
    for _ in range(new_tokens):
        p, q = models(sequences)
        draft = TopK.of(p, k)
        sent_bytes = TOKEN_ID_BYTES + draft.nbytes // len(draft)  # a transmitted token: its id and its top-k
        drafts = draft.ids[:, 0] if greedy else draft.sample(rng)
        verdict = verify_greedy(q, drafts) if greedy else verify_sampled(draft, q, drafts, rng)
        h = uncertainty(p)
        sent = np.asarray(transmit(Step(h, drafts, ~verdict.accepted)), dtype=bool)
        emitted = np.where(sent, verdict.final, drafts)
        if greedy:  # the hybrid's distribution: a point mass at the emitted token
            tv = np.where(emitted == q.argmax(axis=1), 0.0, 1.0) * ~sent
        else:  # kept: the drafter's top-k distribution; verified: exactly q
            tv = 0.5 * np.abs(draft.dense(q.shape[1]) - q).sum(axis=1) * ~sent
        for i, seq in enumerate(sequences):
            seq.append(int(emitted[i]))
            trace.uncertainty.append(float(h[i]))
            trace.transmitted.append(bool(sent[i]))
            trace.beta.append(float(verdict.beta[i]))
            trace.rejected.append(bool(sent[i] and not verdict.accepted[i]))
            trace.tv.append(float(tv[i]))
            trace.llm_logprob.append(float(np.log(max(q[i, emitted[i]], 1e-300))))
            trace.draft_bytes.append(sent_bytes if sent[i] else 0)
    return [s[len(p):] for s, p in zip(sequences, prompts)], trace


def greedy_fidelity(generated: list[list[int]], reference: list[list[int]]) -> float:
    """Share of generated tokens equal to the reference (the LLM's own greedy continuation) at the
    same position."""
    same = [a == b for g, r in zip(generated, reference) for a, b in zip(g, r)]
    return float(np.mean(same)) if same else 0.0


def metrics(trace: Trace, generated: list[list[int]], reference: list[list[int]] | None) -> dict[str, float]:
    """The report's numbers for one policy's trace (``reference``: the LLM's greedy continuations)."""
    sent = np.asarray(trace.transmitted)
    out = {
        "tokens": float(len(sent)),
        "transmitted_share": float(sent.mean()) if len(sent) else 0.0,
        "rejection_rate": float(np.mean(np.asarray(trace.rejected)[sent])) if sent.any() else 0.0,
        "mean_tv_to_llm": float(np.mean(trace.tv)) if trace.tv else 0.0,
        "llm_perplexity": float(np.exp(-np.mean(trace.llm_logprob))) if trace.llm_logprob else float("nan"),
        "uplink_draft_bytes": float(np.sum(trace.draft_bytes)),
    }
    if reference is not None:
        out["greedy_fidelity"] = greedy_fidelity(generated, reference)
    return out

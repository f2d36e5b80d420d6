"""The drafter and the LLM for token-level decoding (torch).

Drafter and LLM must share a tokenizer, and offline there is one causal LM per family
(SmolLM2-135M-Instruct, Gemma-3-270M), so the drafter is the LLM's own first ``layers`` decoder
layers followed by its final norm and output head: a self-speculative early exit.
``bench/drafter.py`` measures how often each depth agrees with the LLM and how fast it decodes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedhlm_app.config import ConfigError
from fedhlm_app.oracle.causal_lm import load_causal_lm


def next_token_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The LLM's head on final-norm hidden states, with its logit soft-capping where it has one (Gemma)."""
    logits = model.lm_head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


class EarlyExitPair:
    """A causal LM and its first-``layers`` early exit, both read from one forward pass.

    ``__call__`` returns the next-token distributions of the drafter and of the LLM for a batch of
    token-id sequences (left-padded, so the next token is always at the last position).
    """

    def __init__(self, model: str, layers: int) -> None:
        self.tokenizer, self.model = load_causal_lm(model)
        self.model.requires_grad_(False)
        depth = self.model.config.num_hidden_layers
        if not 0 < layers < depth:
            raise ConfigError(f"drafter-layers {layers}: the drafter is the first 1..{depth - 1} of the LLM's {depth} layers")
        self.layers = layers
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def __call__(self, sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        longest = max(len(s) for s in sequences)
        ids = torch.tensor([[self.pad] * (longest - len(s)) + s for s in sequences])
        mask = torch.tensor([[0] * (longest - len(s)) + [1] * len(s) for s in sequences])
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
            hidden = self.model.model.norm(out.hidden_states[self.layers][:, -1])
            p = torch.softmax(next_token_logits(self.model, hidden).double(), -1)
            q = torch.softmax(out.logits[:, -1].double(), -1)
        return p.numpy(), q.numpy()

"""The ``openai`` oracle backend: any OpenAI-compatible chat-completions server.

Works with vLLM, Ollama, llama.cpp's server, ``transformers serve`` and OpenAI
itself. Each text is one chat request (few-shot examples as earlier turns,
temperature 0, a few tokens), sent ``oracle-concurrency`` at a time. When the
server returns ``logprobs``, q is the probability mass of the first answer
token spread over the labels it can start; otherwise (the server refuses
logprobs or omits them) q is one-hot on the label the model wrote, which the
speculative rule handles like any LLM that answers with a label. An answer
that names no label leaves the item unanswered (it keeps the SLM draft).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fedhlm_app.config import ConfigError
from fedhlm_app.data.datasets import Dataset
from fedhlm_app.oracle.base import CircuitBreaker, ModelOracle, OracleError, Traffic, store_folder
from fedhlm_app.oracle.http import HTTPStatusError, JSONClient, reachable
from fedhlm_app.oracle.prompts import LabelPrompt, label_prompt

URL_ENV, KEY_ENV = "OPENAI_BASE_URL", "OPENAI_API_KEY"
TOP_LOGPROBS = 20
MAX_TOKENS = 16  # a label is a word or two; small models sometimes start with 'The topic is'


class OpenAIChatOracle(ModelOracle):
    """q from a chat-completions server: log-probabilities when offered, else the label it answers."""

    def __init__(self, client: JSONClient, model: str, prompt: LabelPrompt, seed: int, cache_dir: str,
                 concurrency: int, batch_size: int) -> None:
        self.client, self.model, self.prompt, self.concurrency = client, model, prompt, concurrency
        self.use_logprobs = True  # switched off for good when the server refuses them
        ident = f"{client.base_url}|{model}|{prompt!r}"
        super().__init__(len(prompt.class_names), seed, store_folder(cache_dir, "openai", ident), batch_size)
        self.breaker = client.breaker

    def compute(self, texts: list[str]) -> np.ndarray:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answers = list(pool.map(self._ask, texts))
        errors = [err for _, err, _ in answers if err]
        if errors:
            self.last_failure = errors[0]  # an example; the Verification counts the items
        for _, _, traffic in answers:  # counted per request, merged here: threads never share a counter
            self.traffic.add(traffic)
        return np.stack([q for q, _, _ in answers]) if answers else np.zeros((0, self.num_classes))

    def _ask(self, text: str) -> tuple[np.ndarray, str, Traffic]:
        """(q or a NaN row, error message, traffic) for one text; never raises."""
        traffic = Traffic()
        request = {"model": self.model, "messages": self.prompt.chat(text), "temperature": 0, "max_tokens": MAX_TOKENS}
        try:
            reply = self._complete(request, traffic)
            return self._distribution(reply), "", traffic
        except OracleError as exc:
            return np.full(self.num_classes, np.nan), str(exc), traffic

    def _complete(self, request: dict[str, Any], traffic: Traffic) -> Any:
        if self.use_logprobs:
            try:
                return self.client.request("POST", "/chat/completions", {**request, "logprobs": True, "top_logprobs": TOP_LOGPROBS}, traffic)
            except HTTPStatusError as exc:
                if exc.status not in (400, 422):
                    raise
                self.use_logprobs = False  # this server does not do logprobs: ask for the label alone
        return self.client.request("POST", "/chat/completions", request, traffic)

    def _distribution(self, reply: Any) -> np.ndarray:
        try:
            choice = reply["choices"][0]
            answer = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise OracleError(f"malformed chat completion: {str(reply)[:200]}") from None
        q = self._from_logprobs(choice.get("logprobs"))
        if q is not None:
            return q
        label = self.prompt.parse(answer)
        if label is None:
            raise OracleError(f"the answer {answer[:60]!r} names no label")
        return np.eye(self.num_classes)[label]

    def _from_logprobs(self, logprobs: Any) -> np.ndarray | None:
        """Mass of the first answer token on each label it can begin (None if there is none)."""
        try:
            top = logprobs["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            return None
        mass = np.zeros(self.num_classes)
        names = [n.lower() for n in self.prompt.class_names]
        for entry in top:
            token = str(entry.get("token", "")).strip().lower()
            starts = [c for c, name in enumerate(names) if token and name.startswith(token)]
            if len(starts) == 1 and math.isfinite(entry.get("logprob", -math.inf)):
                mass[starts[0]] += math.exp(entry["logprob"])
        return mass / mass.sum() if mass.sum() > 1e-6 else None


def server_url(cfg: Any) -> str:
    url = cfg.oracle_url or os.environ.get(URL_ENV, "")
    if not url or not cfg.oracle_model:
        raise ConfigError(
            f"oracle 'openai' needs 'oracle-url' (or ${URL_ENV}), e.g. http://localhost:8000/v1 for vLLM or "
            "http://localhost:11434/v1 for Ollama, and 'oracle-model', the model name the server knows"
        )
    return url


def check_config(cfg: Any) -> None:
    """The server answers HTTP at its URL (any status: some servers list no models)."""
    reachable(server_url(cfg).rstrip("/") + "/models", cfg.oracle_api_key or os.environ.get(KEY_ENV, ""), cfg.oracle_timeout)


def from_config(cfg: dict[str, Any], dataset: Dataset) -> OpenAIChatOracle:
    url = server_url(cfg)
    client = JSONClient(url.rstrip("/"), cfg.oracle_api_key or os.environ.get(KEY_ENV, ""), cfg.oracle_timeout, cfg.oracle_retries,
                        CircuitBreaker(cfg.oracle_max_failures))
    return OpenAIChatOracle(client, cfg.oracle_model, label_prompt(cfg, dataset), cfg.seed, cfg.cache_dir,
                            cfg.oracle_concurrency, cfg.oracle_batch_size)

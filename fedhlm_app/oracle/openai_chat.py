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

import asyncio
import math
import os
from typing import Any

import httpx
import numpy as np
import openai
from anyio.from_thread import start_blocking_portal

from fedhlm_app.config import ConfigError
from fedhlm_app.data.datasets import Dataset
from fedhlm_app.oracle.base import CircuitBreaker, ModelOracle, OracleError, store_folder
from fedhlm_app.oracle.http import async_traffic_hooks, reachable
from fedhlm_app.oracle.prompts import LabelPrompt, label_prompt

URL_ENV, KEY_ENV = "OPENAI_BASE_URL", "OPENAI_API_KEY"
TOP_LOGPROBS = 20
MAX_TOKENS = 16  # a label is a word or two; small models sometimes start with 'The topic is'


class OpenAIChatOracle(ModelOracle):
    """q from a chat-completions server: log-probabilities when offered, else the label it answers.

    Requests go through the ``openai`` SDK's async client (one pooled connection per
    concurrent request, the SDK's timeouts and retries, which back off with jitter and
    honour ``Retry-After``) on an event loop of its own, so a synchronous caller (the
    ServerApp) can use it from any thread. ``close`` stops that loop.
    """

    def __init__(self, base_url: str, api_key: str, model: str, prompt: LabelPrompt, seed: int, cache_dir: str,
                 concurrency: int, batch_size: int, timeout: float, retries: int, breaker: CircuitBreaker) -> None:
        ident = f"{base_url}|{model}|{prompt!r}"
        super().__init__(len(prompt.class_names), seed, store_folder(cache_dir, "openai", ident), batch_size)
        self.base_url, self.model, self.prompt, self.concurrency, self.breaker = base_url, model, prompt, concurrency, breaker
        self.use_logprobs = True  # switched off for good when the server refuses them
        pool = openai.DefaultAsyncHttpxClient(event_hooks=async_traffic_hooks(self.traffic),
                                              limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
        # Local servers (vLLM, Ollama, transformers serve) take any key, but the SDK insists on one.
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=retries,
                                         http_client=pool)
        self._portal_context = start_blocking_portal()
        self._portal = self._portal_context.__enter__()

    def compute(self, texts: list[str]) -> np.ndarray:
        answers = self._portal.call(self._ask_all, texts)
        errors = [err for _, err in answers if err]
        if errors:
            self.last_failure = errors[0]  # an example; the Verification counts the items
        return np.stack([q for q, _ in answers]) if answers else np.zeros((0, self.num_classes))

    async def _ask_all(self, texts: list[str]) -> list[tuple[np.ndarray, str]]:
        in_flight = asyncio.Semaphore(self.concurrency)

        async def ask(text: str) -> tuple[np.ndarray, str]:
            async with in_flight:
                return await self._ask(text)

        return list(await asyncio.gather(*(ask(t) for t in texts)))

    async def _ask(self, text: str) -> tuple[np.ndarray, str]:
        """(q or a NaN row, error message) for one text; never raises."""
        unanswered = np.full(self.num_classes, np.nan)
        if self.breaker.open:
            return unanswered, f"{self.base_url} {self.breaker.why_open()}"
        try:
            reply = await self._complete(self.prompt.chat(text))
        except openai.APIError as exc:
            self.breaker.record(ok=False)
            return unanswered, _describe(exc)
        self.breaker.record(ok=True)
        try:
            return self._distribution(reply), ""
        except OracleError as exc:
            return unanswered, str(exc)

    async def _complete(self, messages: list[dict[str, str]]) -> Any:
        request: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}
        if self.use_logprobs:
            try:
                return await self.client.chat.completions.create(**request, logprobs=True, top_logprobs=TOP_LOGPROBS)
            except (openai.BadRequestError, openai.UnprocessableEntityError):
                self.use_logprobs = False  # this server does not do logprobs: ask for the label alone
        return await self.client.chat.completions.create(**request)

    def _distribution(self, reply: Any) -> np.ndarray:
        try:
            choice = reply.choices[0]
            answer = choice.message.content or ""
        except (AttributeError, IndexError, TypeError):
            raise OracleError(f"malformed chat completion: {str(reply)[:200]}") from None
        q = self._from_logprobs(choice.logprobs)
        if q is not None:
            return q
        label = self.prompt.parse(answer)
        if label is None:
            raise OracleError(f"the answer {answer[:60]!r} names no label")
        return np.eye(self.num_classes)[label]

    def close(self) -> None:
        if self._portal_context is not None:
            self._portal.call(self.client.close)
            self._portal_context.__exit__(None, None, None)
            self._portal_context = None

    def _from_logprobs(self, logprobs: Any) -> np.ndarray | None:
        """Mass of the first answer token on each label it can begin (None if there is none)."""
        try:
            top = logprobs.content[0].top_logprobs
        except (AttributeError, IndexError, TypeError):
            return None
        mass = np.zeros(self.num_classes)
        names = [n.lower() for n in self.prompt.class_names]
        for entry in top:
            token = str(entry.token or "").strip().lower()
            starts = [c for c, name in enumerate(names) if token and name.startswith(token)]
            if len(starts) == 1 and math.isfinite(entry.logprob):
                mass[starts[0]] += math.exp(entry.logprob)
        return mass / mass.sum() if mass.sum() > 1e-6 else None


def _describe(exc: openai.APIError) -> str:
    if isinstance(exc, openai.APIStatusError):
        return exc.message  # "Error code: 500 - <the server's message>"
    cause = exc.__cause__
    return f"{type(exc).__name__}: {exc}" + (f" ({type(cause).__name__}: {cause})" if cause else "")


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


def from_config(cfg: Any, dataset: Dataset) -> OpenAIChatOracle:
    return OpenAIChatOracle(server_url(cfg).rstrip("/"), cfg.oracle_api_key or os.environ.get(KEY_ENV, ""), cfg.oracle_model,
                            label_prompt(cfg, dataset), cfg.seed, cfg.cache_dir, cfg.oracle_concurrency, cfg.oracle_batch_size,
                            cfg.oracle_timeout, cfg.oracle_retries, CircuitBreaker(cfg.oracle_max_failures))

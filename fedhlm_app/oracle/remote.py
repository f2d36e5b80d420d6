"""The ``remote`` oracle backend: FedHLM's own oracle service over HTTP.

The ServerApp sends each round's escalated items in requests of at most
``oracle-batch-size`` items over one pooled connection (``JSONClient``); each
request has its own timeout and retries with backoff, and a request that still
fails leaves only its items unanswered (they keep the SLM draft). Start the service with ``python -m fedhlm_app.oracle.service``.
"""

from __future__ import annotations

import os
from logging import WARNING
from typing import Any

import numpy as np

from fedhlm_app.data.datasets import Dataset
from fedhlm_app.oracle.base import CircuitBreaker, EscalationBatch, Oracle, OracleError, Verification
from fedhlm_app.oracle.http import JSONClient, reachable
from fedhlm_app.oracle.wire import parse_distribution_reply, parse_verify_reply, verify_request
from fedhlm_app.routing.speculative import Verdict

URL_ENV, TOKEN_ENV = "FEDHLM_ORACLE_URL", "FEDHLM_ORACLE_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8800"


class RemoteOracle(Oracle):
    """Verification by a FedHLM oracle service."""

    def __init__(self, client: JSONClient, class_names: list[str], seed: int, batch_size: int) -> None:
        super().__init__(len(class_names), seed)
        self.client, self.batch_size = client, batch_size
        self.breaker, self.traffic = client.breaker, client.traffic
        self._check_service(class_names)

    def _check_service(self, class_names: list[str]) -> None:
        """Say at start whether the service is up and serves these classes (a down service is not fatal)."""
        from flwr.common import log

        try:
            health = self.client.request("GET", "/health")
        except OracleError as exc:
            log(WARNING, "oracle service %s is not answering (%s); escalated items keep their SLM draft until it does",
                self.client.base_url, exc)
            return
        if health.get("classes") != class_names:
            log(WARNING, "oracle service %s serves classes %s, this run has %s", self.client.base_url, health.get("classes"), class_names)

    def distribution(self, texts: list[str]) -> np.ndarray:
        chunks = [texts[i : i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        replies = [self.client.request("POST", "/v1/distribution", {"texts": chunk}) for chunk in chunks]
        parts = [parse_distribution_reply(r, len(c), self.num_classes) for r, c in zip(replies, chunks)]
        return np.concatenate(parts) if parts else np.zeros((0, self.num_classes))

    def verify(self, batch: EscalationBatch) -> Verification:
        parts = []
        for start in range(0, len(batch), self.batch_size):
            chunk = _slice(batch, start, start + self.batch_size)
            try:  # a failed request costs only its own items
                reply = self.client.request("POST", "/v1/verify", verify_request(chunk))
                parts.append(parse_verify_reply(reply, len(chunk), self.num_classes))
            except OracleError as exc:
                parts.append(Verification.unanswered(len(chunk), str(exc)))
        return _join(parts, len(batch), self.num_classes)

    def close(self) -> None:
        self.client.close()


def _slice(batch: EscalationBatch, start: int, stop: int) -> EscalationBatch:
    return EscalationBatch(batch.ids[start:stop], batch.texts[start:stop], batch.probs[start:stop], batch.drafts[start:stop])


def _join(parts: list[Verification], n: int, num_classes: int) -> Verification:
    """One verification from consecutive chunks'."""
    if not parts:
        return Verification.unanswered(n, "")
    verdict = Verdict(*(np.concatenate([getattr(p.verdict, f) for p in parts]) for f in ("beta", "accepted", "final")))
    q = np.concatenate([p.q if p.q is not None else np.full((len(p.answered), num_classes), np.nan) for p in parts])
    causes = sorted({p.failure for p in parts if p.failure})
    return Verification(np.concatenate([p.answered for p in parts]), verdict, "; ".join(causes), q)


def check_config(cfg: Any) -> None:
    """The service answers ``/health``."""
    url = (cfg.oracle_url or os.environ.get(URL_ENV, "") or DEFAULT_URL).rstrip("/")
    reachable(url + "/health", cfg.oracle_api_key or os.environ.get(TOKEN_ENV, ""), cfg.oracle_timeout)


def from_config(cfg: dict[str, Any], dataset: Dataset) -> RemoteOracle:
    client = JSONClient(
        base_url=cfg.oracle_url or os.environ.get(URL_ENV, "") or DEFAULT_URL,
        token=cfg.oracle_api_key or os.environ.get(TOKEN_ENV, ""),
        timeout=cfg.oracle_timeout,
        retries=cfg.oracle_retries,
        breaker=CircuitBreaker(cfg.oracle_max_failures),
    )
    return RemoteOracle(client, list(dataset.class_names), cfg.seed, cfg.oracle_batch_size)

"""A small JSON-over-HTTP client with timeouts, retries with backoff and byte counting.

Used by the networked oracle backends (``remote``, ``openai``). It counts what
crosses the wire (request line, headers and body each way) into a ``Traffic``
so the ServerApp can book it in the communication ledger.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fedhlm_app.oracle.base import CircuitBreaker, OracleError, Traffic

BACKOFF_S = 0.25  # first retry delay; doubles per retry
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}


class HTTPStatusError(OracleError):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class JSONClient:
    """POST/GET JSON to one base URL."""

    base_url: str
    token: str = ""
    timeout: float = 60.0
    retries: int = 2
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)

    def request(self, method: str, path: str, payload: Any, traffic: Traffic) -> Any:
        """Send with retries (connection errors, timeouts, 408/429/5xx); raise ``OracleError`` at the end.
        While the breaker is open, fail at once."""
        if self.breaker.open:
            raise OracleError(f"{self.base_url} not called: its last {self.breaker.failures} requests failed "
                              f"(oracle-max-failures = {self.breaker.limit})")
        try:
            reply = self._with_retries(method, path, payload, traffic)
        except OracleError:
            self.breaker.record(ok=False)
            raise
        self.breaker.record(ok=True)
        return reply

    def _with_retries(self, method: str, path: str, payload: Any, traffic: Traffic) -> Any:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                return self._once(method, path, payload, traffic)
            except HTTPStatusError as exc:
                if exc.status not in RETRY_STATUSES:
                    raise
                last = exc
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out
                last = OracleError(f"{type(exc).__name__}: {exc or 'no detail'}")
        raise OracleError(f"{method} {self.base_url}{path} failed after {self.retries + 1} attempts: {last}")

    def _once(self, method: str, path: str, payload: Any, traffic: Traffic) -> Any:
        url = urlsplit(self.base_url)
        conn_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = conn_class(url.hostname, url.port, timeout=self.timeout)
        body = b"" if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json", "Content-Length": str(len(body))}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        target = url.path.rstrip("/") + path
        try:
            conn.request(method, target, body=body or None, headers=headers)
            traffic.requests += 1
            traffic.sent += len(f"{method} {target} HTTP/1.1\r\n") + sum(len(f"{k}: {v}\r\n") for k, v in headers.items()) + len(body)
            response = conn.getresponse()
            data = response.read()
            traffic.received += len(f"HTTP/1.1 {response.status} {response.reason}\r\n") + len(str(response.headers)) + len(data)
        finally:
            conn.close()
        if response.status >= 400:
            raise HTTPStatusError(response.status, _error_message(data))
        try:
            return json.loads(data)
        except ValueError:
            raise OracleError(f"{method} {target}: the reply is not JSON ({data[:80]!r})") from None


def reachable(url: str, token: str, timeout: float) -> None:
    """Raise ``OracleError`` unless something answers HTTP at ``url`` (any status, one try)."""
    split = urlsplit(url)
    client = JSONClient(f"{split.scheme}://{split.netloc}", token, min(timeout, 10.0), retries=0)
    try:
        client.request("GET", split.path, None, Traffic())
    except HTTPStatusError:
        return  # it answered
    except OracleError as exc:
        raise OracleError(f"the oracle server at {url} does not answer: {exc}") from None


def _error_message(data: bytes) -> str:
    """The message of a structured error reply, else the start of the body."""
    try:
        err = json.loads(data).get("error", {})
        return str(err.get("message", err) if isinstance(err, dict) else err)
    except (ValueError, AttributeError):
        return data[:200].decode(errors="replace")

"""HTTP for the networked oracle backends: pooled httpx connections, retries, every byte booked.

``traffic_hooks`` count what crosses the wire (request line, headers and body each
way, every attempt) into a ``Traffic`` so the ServerApp can book it in the
communication ledger; the ``openai`` backend hands them to the SDK's httpx client.
``JSONClient`` is the ``remote`` backend's client: one connection pool per base URL,
a timeout per request, retries of connection errors, timeouts and 408/429/5xx with
jittered exponential backoff that honours ``Retry-After``, and a circuit breaker.
"""

from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from fedhlm_app.oracle.base import CircuitBreaker, OracleError, Traffic

BACKOFF_S = 0.25  # first retry delay; doubles per retry, plus up to 25% jitter so clients do not retry in step
MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is not waited for: the items keep their draft instead
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}


def _header_bytes(headers: httpx.Headers) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers.raw) + 2  # "k: v\r\n" each, then a blank line


def request_bytes(request: httpx.Request) -> int:
    line = f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n"
    return len(line) + _header_bytes(request.headers) + len(request.content)


def response_bytes(response: httpx.Response) -> int:
    """The status line, headers and body as received (compressed bodies at their wire size); call after reading."""
    return len(f"HTTP/1.1 {response.status_code} {response.reason_phrase}\r\n") + _header_bytes(response.headers) + \
        response.num_bytes_downloaded


def traffic_hooks(traffic: Traffic) -> dict[str, list[Any]]:
    """httpx event hooks (for a ``httpx.Client``) that book every request and response in ``traffic``."""

    def on_request(request: httpx.Request) -> None:
        traffic.requests += 1
        traffic.sent += request_bytes(request)

    def on_response(response: httpx.Response) -> None:
        response.read()
        traffic.received += response_bytes(response)

    return {"request": [on_request], "response": [on_response]}


def async_traffic_hooks(traffic: Traffic) -> dict[str, list[Any]]:
    """``traffic_hooks`` for a ``httpx.AsyncClient`` (all calls on one event loop: no lock needed)."""

    async def on_request(request: httpx.Request) -> None:
        traffic.requests += 1
        traffic.sent += request_bytes(request)

    async def on_response(response: httpx.Response) -> None:
        await response.aread()
        traffic.received += response_bytes(response)

    return {"request": [on_request], "response": [on_response]}


class HTTPStatusError(OracleError):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.retry_after = status, retry_after


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asked to wait (``Retry-After``: seconds or an HTTP date), if it asked."""
    value = headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class JSONClient:
    """JSON requests to one base URL over a connection pool; traffic booked in ``traffic``."""

    def __init__(self, base_url: str, token: str = "", timeout: float = 60.0, retries: int = 2,
                 breaker: CircuitBreaker | None = None, traffic: Traffic | None = None) -> None:
        self.base_url, self.retries = base_url.rstrip("/"), retries
        self.breaker = breaker or CircuitBreaker()
        self.traffic = traffic or Traffic()
        headers = {"Accept": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, event_hooks=traffic_hooks(self.traffic))

    def request(self, method: str, path: str, payload: Any = None) -> Any:
        """The decoded JSON reply; ``OracleError`` when every attempt failed (``HTTPStatusError`` for an
        error status that is not worth retrying). While the breaker is open, fail at once."""
        if self.breaker.open:
            raise OracleError(f"{self.base_url} {self.breaker.why_open()}")
        try:
            reply = self._with_retries(method, path, payload)
        except OracleError:
            self.breaker.record(ok=False)
            raise
        self.breaker.record(ok=True)
        return reply

    def _with_retries(self, method: str, path: str, payload: Any) -> Any:
        last: OracleError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                backoff = BACKOFF_S * 2 ** (attempt - 1) * random.uniform(1.0, 1.25)
                asked = last.retry_after if isinstance(last, HTTPStatusError) else None
                time.sleep(max(backoff, asked or 0.0))
            try:
                return self._once(method, path, payload)
            except HTTPStatusError as exc:
                if exc.status not in RETRY_STATUSES or (exc.retry_after or 0.0) > MAX_RETRY_AFTER_S:
                    raise
                last = exc
            except httpx.TransportError as exc:  # refused, reset, timed out, TLS
                last = OracleError(f"{type(exc).__name__}: {exc or 'no detail'}")
        raise OracleError(f"{method} {self.base_url}{path} failed after {self.retries + 1} attempts: {last}")

    def _once(self, method: str, path: str, payload: Any) -> Any:
        response = self.http.request(method, path, json=payload)
        if response.status_code >= 400:
            raise HTTPStatusError(response.status_code, _error_message(response), retry_after(response.headers))
        try:
            return response.json()
        except ValueError:
            raise OracleError(f"{method} {path}: the reply is not JSON ({response.content[:80]!r})") from None

    def close(self) -> None:
        self.http.close()


def reachable(url: str, token: str, timeout: float) -> None:
    """Raise ``OracleError`` unless something answers HTTP at ``url`` (any status, one try)."""
    split = urlsplit(url)
    client = JSONClient(f"{split.scheme}://{split.netloc}", token, min(timeout, 10.0), retries=0)
    try:
        client.request("GET", split.path)
    except HTTPStatusError:
        return  # it answered
    except OracleError as exc:
        raise OracleError(f"the oracle server at {url} does not answer: {exc}") from None
    finally:
        client.close()


def _error_message(response: httpx.Response) -> str:
    """The message of a structured error reply, else the start of the body."""
    try:
        err = response.json().get("error", {})
        return str(err.get("message", err) if isinstance(err, dict) else err)
    except (ValueError, AttributeError):
        return response.content[:200].decode(errors="replace")

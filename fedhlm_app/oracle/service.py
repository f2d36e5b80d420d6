"""The LLM oracle service: any oracle backend behind an HTTP API (FastAPI, served by uvicorn).

    python -m fedhlm_app.oracle.service --backend classifier -c "oracle-model='models/cloud-mpnet'" --port 8800
    FEDHLM_ORACLE_TOKEN=secret python -m fedhlm_app.oracle.service --backend causal-lm --host 0.0.0.0 \
        --tls-cert secrets/server.pem --tls-key secrets/server.key

Beyond loopback it refuses to start without a token (``--no-token`` overrides).

Endpoints: ``GET /health``, ``POST /v1/verify``, ``POST /v1/distribution`` (formats in
``fedhlm_app.oracle.wire``, OpenAPI at ``/docs``), ``GET /metrics`` (Prometheus). The
backend is configured with the same run-config keys as a FedHLM run (defaults from
pyproject.toml, ``-c`` overrides) and loads once before the port opens.

Requests are checked before the model runs: bad ones get a 4xx with a JSON message
(400 malformed, 401 token, 411/413 size, 404/405 route); a failing backend or a full
queue gets a 503, never a 500. Connections are served by uvicorn's event loop, so an
idle or slow client holds only its own socket (TLS handshakes included). The model
runs on one thread; requests that arrive together are verified as one batch
(``fedhlm_app.oracle.batching``) and each caller gets its own answers.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import numpy as np
import uvicorn
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from fedhlm_app.config import ConfigError, validate
from fedhlm_app.oracle.base import BACKENDS, EscalationBatch, Oracle, Verification, is_distribution
from fedhlm_app.oracle.batching import DynamicBatcher, Overloaded
from fedhlm_app.oracle.metrics import CONTENT_TYPE, ServiceMetrics
from fedhlm_app.oracle.wire import (
    DistributionReply,
    DistributionRequest,
    ErrorReply,
    Health,
    VerifyReply,
    VerifyRequest,
    WireError,
    describe,
    distribution_reply,
    escalation_batch,
    texts_of,
    verify_reply,
)

TOKEN_ENV = "FEDHLM_ORACLE_TOKEN"
ROUTES_HELP = "GET /health, GET /metrics, POST /v1/verify, POST /v1/distribution; OpenAPI at /docs"
# Module level: FastAPI resolves the (postponed) annotations of the endpoints in this module's globals.
BEARER = HTTPBearer(auto_error=False, description=f"the service's token (${TOKEN_ENV}); none when it runs without one")
Job = TypeVar("Job")
Answer = TypeVar("Answer")


@dataclass(frozen=True)
class Limits:
    """What one request may ask and how requests are batched."""

    max_batch: int = 256  # items per request
    max_body_bytes: int = 8 * 2**20
    batch_window_ms: float = 5.0  # how long a model batch waits for more requests after the first
    model_batch: int = 256  # items a dynamic batch collects (a larger request runs alone: requests are never split);
    #                         the backend still runs them oracle-batch-size at a time
    max_waiting: int = 1024  # requests queued for the model; beyond it: 503 with Retry-After
    max_connections: int = 2048  # open connections; beyond it uvicorn answers 503

    def check(self) -> None:
        for name in ("max_batch", "max_body_bytes", "model_batch", "max_waiting", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if not 0 <= self.batch_window_ms <= 1000:
            raise ValueError(f"batch-window-ms must be in [0, 1000], not {self.batch_window_ms}")


class ModelWorker:
    """The backend's two operations behind dynamic batchers that share one model thread."""

    def __init__(self, oracle: Oracle, limits: Limits, metrics: ServiceMetrics, arriving: Callable[[], int]) -> None:
        self.oracle = oracle
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oracle-model")
        common = {"executor": self.thread, "max_items": limits.model_batch, "window_s": limits.batch_window_ms / 1000,
                  "max_waiting": limits.max_waiting, "observe": metrics.batch, "arriving": arriving}
        self.verifier: DynamicBatcher[EscalationBatch, Verification] = DynamicBatcher(self._verify, len, **common)
        self.distributor: DynamicBatcher[list[str], np.ndarray] = DynamicBatcher(self._distribution, len, **common)

    def _verify(self, batches: Sequence[EscalationBatch]) -> list[Verification]:
        result = self.oracle.verify(EscalationBatch.concat(list(batches), self.oracle.num_classes))
        bounds = np.cumsum([0] + [len(b) for b in batches])
        return [result.take(int(start), int(stop)) for start, stop in zip(bounds[:-1], bounds[1:])]

    def _distribution(self, texts: Sequence[list[str]]) -> list[np.ndarray]:
        flat = [t for part in texts for t in part]
        q = np.asarray(self.oracle.distribution(flat), dtype=np.float64).reshape(len(flat), self.oracle.num_classes)
        return np.split(q, np.cumsum([len(part) for part in texts])[:-1])

    def start(self) -> None:
        self.verifier.start()
        self.distributor.start()

    async def stop(self) -> None:
        await self.verifier.stop()
        await self.distributor.stop()
        self.thread.shutdown(wait=True)


def create_app(oracle: Oracle, backend: str, class_names: list[str], token: str = "", limits: Limits = Limits()) -> FastAPI:
    """The service as an ASGI app (any ASGI server can run it; ``OracleService`` runs it with uvicorn)."""
    limits.check()
    metrics = ServiceMetrics()
    worker = ModelWorker(oracle, limits, metrics, arriving=lambda: metrics.posts_in_flight)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        await worker.stop()

    # strict_content_type=False: a JSON body without a Content-Type header is read as JSON, as before.
    app = FastAPI(title="FedHLM oracle service", summary="The cloud LLM that verifies the SLM drafts clients escalate",
                  version="1", lifespan=lifespan, strict_content_type=False,
                  responses={400: {"model": ErrorReply}, 503: {"model": ErrorReply}})
    app.add_middleware(BodyGuard, max_body_bytes=limits.max_body_bytes, metrics=metrics)

    async def authorize(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> None:
        if not token:
            return
        if credentials is None:
            raise WireError(401, "unauthorized", "this service needs 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise WireError(401, "unauthorized", "wrong bearer token")

    async def on_model(batcher: DynamicBatcher[Job, Answer], job: Job, items: int, route: str) -> Answer:
        metrics.items.labels(route).inc(items)
        metrics.waiting.inc()
        try:
            return await batcher.submit(job)
        except Overloaded as exc:
            raise WireError(503, "overloaded", f"{exc}; retry shortly") from None
        except Exception as exc:  # noqa: BLE001 - the backend failed: the caller can retry or fall back
            metrics.failures.inc()
            raise WireError(503, "backend_error", f"the {backend} backend failed: {type(exc).__name__}: {exc}") from None
        finally:
            metrics.waiting.dec()

    @app.get("/health", summary="what the service serves")
    async def health() -> Health:
        return Health(status="ok", backend=backend, classes=class_names, max_batch=limits.max_batch, auth=bool(token))

    @app.post("/v1/verify", response_model_exclude_none=True, dependencies=[Security(authorize)],
              summary="speculatively verify SLM drafts", responses={401: {"model": ErrorReply}, 413: {"model": ErrorReply}})
    async def verify(request: VerifyRequest) -> VerifyReply:
        batch = escalation_batch(request, oracle.num_classes, limits.max_batch)
        return verify_reply(await on_model(worker.verifier, batch, len(batch), "/v1/verify"))

    @app.post("/v1/distribution", dependencies=[Security(authorize)], summary="the LLM's class distribution of each text",
              responses={401: {"model": ErrorReply}, 413: {"model": ErrorReply}})
    async def distribution(request: DistributionRequest) -> DistributionReply:
        texts = texts_of(request, limits.max_batch)
        q = await on_model(worker.distributor, texts, len(texts), "/v1/distribution")
        return distribution_reply(q, is_distribution(q))

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    _error_handlers(app)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": {"code", "message"}}`` (``wire.ErrorReply``)."""

    def reply(exc: WireError, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(WireError)
    async def refused(_: Request, exc: WireError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {"Retry-After": "1"} if exc.code == "overloaded" else None
        return reply(exc, headers)

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e["type"] == "json_invalid" for e in errors):
            return reply(WireError(400, "invalid_json", f"the body is not JSON: {errors[0].get('ctx', {}).get('error', '')}"))
        return reply(WireError(400, "bad_request", describe(errors)))

    @app.exception_handler(HTTPException)
    async def routing(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"no route {request.method} {request.url.path} ({ROUTES_HELP})" if exc.status_code in (404, 405) else str(exc.detail)
        return reply(WireError(exc.status_code, code, message), exc.headers)


Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class BodyGuard:
    """ASGI middleware: a POST must state its size (411) within the limit (413) before its body is read;
    every request is timed and counted for /metrics, and admitted POSTs are counted while in flight
    (the batchers' ``arriving``)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: ServiceMetrics) -> None:
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def send_and_note(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await JSONResponse(refusal.body(), refusal.status, headers={"Connection": "close"})(scope, receive, send_and_note)
        elif scope["method"] == "POST":
            self.metrics.posts_in_flight += 1
            try:
                await self.app(scope, receive, send_and_note)
            finally:
                self.metrics.posts_in_flight -= 1
        else:
            await self.app(scope, receive, send_and_note)
        self.metrics.request(scope["path"], status[0], time.perf_counter() - started)

    def _refusal(self, scope: Scope) -> WireError | None:
        if scope["method"] != "POST":
            return None
        length = dict(scope["headers"]).get(b"content-length", b"").decode()
        if not length.isdigit():
            return WireError(411, "length_required", "send a Content-Length header")
        if int(length) > self.max_body_bytes:
            return WireError(413, "body_too_large", f"{length} bytes; this service takes at most {self.max_body_bytes}")
        return None


class OracleService:
    """The app on its own socket, served by uvicorn: ``start``/``stop`` in a thread, or ``serve`` in the foreground."""

    def __init__(self, oracle: Oracle, backend: str, class_names: list[str], host: str = "127.0.0.1", port: int = 0,
                 token: str = "", limits: Limits = Limits(), tls_cert: str = "", tls_key: str = "") -> None:
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        self.oracle = oracle
        self.class_names = class_names
        self.config = uvicorn.Config(
            create_app(oracle, backend, class_names, token, limits), ssl_certfile=tls_cert or None, ssl_keyfile=tls_key or None, lifespan="on", ws="none",
            limit_concurrency=limits.max_connections, timeout_keep_alive=30, timeout_graceful_shutdown=30,
            log_level="info" if os.environ.get("FEDHLM_ORACLE_ACCESS_LOG") else "warning",
            access_log=bool(os.environ.get("FEDHLM_ORACLE_ACCESS_LOG")),
        )
        self.config.load()  # a bad certificate or key fails here, not at the first request
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=self.config.backlog)
        self.server = uvicorn.Server(self.config)
        self.scheme = "https" if tls_cert else "http"
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.socket.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"{self.scheme}://{f'[{host}]' if ':' in host else host}:{port}"

    def serve(self) -> None:
        """Serve until SIGINT or SIGTERM, then release the backend (call from the main thread)."""
        # uvicorn stops gracefully on either signal, then raises it again for the handler it found: make
        # that a no-op, so a service stopped on purpose exits 0 rather than dying of the signal.
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop_signal, lambda *_: None)
        try:
            self._run()
        finally:
            self._release()

    def start(self) -> OracleService:
        """Serve from a background thread; returns once the port accepts requests."""
        self._thread = threading.Thread(target=self._run, daemon=True, name="oracle-service")
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the oracle service stopped while starting (see the log above)")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving (requests in flight finish first) and release the backend."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=60)
        self._release()

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=self.config.get_loop_factory()) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        closer = asyncio.create_task(self._close_idle_connections_when_stopping())
        try:
            await self.server.serve(sockets=[self.socket])
        finally:
            closer.cancel()

    async def _close_idle_connections_when_stopping(self) -> None:
        """Once stopping and no request is in flight, drop the connections clients keep alive. uvicorn
        waits for them to close, and a kept-alive TLS connection (an httpx pool holds one) closes only
        after asyncio's 30 s TLS-shutdown timeout, since the idle client never answers the close."""
        while not self.server.should_exit or self.server.server_state.tasks:
            await asyncio.sleep(0.05)
        for connection in list(self.server.server_state.connections):
            connection.transport.abort()

    def _release(self) -> None:
        self.socket.close()
        self.oracle.close()

    def __enter__(self) -> OracleService:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_service(backend: str, overrides: list[str], host: str, port: int, token: str, limits: Limits = Limits(),
                  tls_cert: str = "", tls_key: str = "") -> OracleService:
    """Validate the config, load the dataset's classes and the backend's model, bind the port."""
    from fedhlm_app.oracle.base import make_oracle
    from fedhlm_app.slm.local_data import dataset as configured_dataset
    from fedhlm_app.tools.launch import merged_config, with_default_paths

    limits.check()
    cfg = validate(with_default_paths({**merged_config([], overrides), "oracle": backend}))
    dataset = configured_dataset(cfg)
    oracle = make_oracle(cfg, dataset)
    return OracleService(oracle, backend, list(dataset.class_names), host, port, token, limits, tls_cert, tls_key)


def main(argv: list[str] | None = None) -> int:
    defaults = Limits()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="labels", choices=[b for b in BACKENDS if b != "remote"])
    parser.add_argument("-c", "--run-config", action="append", default=[], help="run-config overrides, e.g. \"oracle-model='x'\"")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8800)
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="items per request")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    parser.add_argument("--batch-window-ms", type=float, default=defaults.batch_window_ms,
                        help="how long a model batch waits for more requests (0: only those already waiting)")
    parser.add_argument("--model-batch", type=int, default=defaults.model_batch,
                        help="items a dynamic batch collects (the backend runs them oracle-batch-size at a time)")
    parser.add_argument("--max-waiting", type=int, default=defaults.max_waiting, help="requests queued for the model before 503")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections, help="open connections before 503")
    parser.add_argument("--tls-cert", default="", help="PEM certificate: serve HTTPS (clients trust its CA via SSL_CERT_FILE)")
    parser.add_argument("--tls-key", default="", help="the certificate's PEM private key")
    parser.add_argument("--no-token", action="store_true",
                        help=f"allow serving beyond loopback without ${TOKEN_ENV} (a private network only)")
    args = parser.parse_args(argv)
    token = os.environ.get(TOKEN_ENV, "")
    if not token and not args.no_token and not is_loopback(args.host):
        # Secure by default: anyone who reaches the port could otherwise use the model.
        print(f"fedhlm oracle service: set {TOKEN_ENV} to serve on {args.host} (or pass --no-token)", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("fedhlm oracle service: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    limits = Limits(args.max_batch, args.max_body_bytes, args.batch_window_ms, args.model_batch, args.max_waiting, args.max_connections)
    try:
        service = build_service(args.backend, args.run_config, args.host, args.port, token, limits, args.tls_cert, args.tls_key)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"fedhlm oracle service: {exc}", file=sys.stderr)
        return 2
    print(f"fedhlm oracle service: backend {args.backend} on {service.url} "
          f"(classes {service.class_names}, bearer token {'required' if token else 'off'})", flush=True)
    service.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The LLM oracle service: any oracle backend behind a small HTTP API.

    python -m fedhlm_app.oracle.service --backend classifier -c "oracle-model='models/cloud-mpnet'" --port 8800
    FEDHLM_ORACLE_TOKEN=secret python -m fedhlm_app.oracle.service --backend causal-lm --host 0.0.0.0 \
        --tls-cert secrets/server.pem --tls-key secrets/server.key

Beyond loopback it refuses to start without a token (``--no-token`` overrides).

Endpoints and formats: ``fedhlm_app.oracle.wire``. The backend is configured with
the same run-config keys as a FedHLM run (defaults from pyproject.toml, ``-c``
overrides), and loads once before the port opens. Requests are checked before
the model runs: bad ones get a 4xx with a message (400 malformed, 401 token,
411/413 size, 404/405 route), a failing backend gets a 503, never a 500 or a
hang (sockets time out). One request runs the model at a time; a request's
items are verified together as one batch.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import os
import signal
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from fedhlm_app.config import ConfigError, validate
from fedhlm_app.oracle.base import BACKENDS, Oracle, is_distribution
from fedhlm_app.oracle.wire import (
    WireError,
    distribution_reply,
    parse_distribution_request,
    parse_verify_request,
    verify_reply,
)

TOKEN_ENV = "FEDHLM_ORACLE_TOKEN"
MAX_BODY_BYTES = 8 * 2**20
MAX_BATCH = 256
SOCKET_TIMEOUT_S = 30.0  # a client that stops sending mid-request frees its thread after this


class OracleService(ThreadingHTTPServer):
    """An HTTP server holding one oracle backend."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], oracle: Oracle, backend: str, class_names: list[str],
                 token: str = "", max_batch: int = MAX_BATCH, max_body_bytes: int = MAX_BODY_BYTES,
                 tls: ssl.SSLContext | None = None) -> None:
        super().__init__(address, _Handler)
        if tls is not None:  # HTTPS: escalated texts and the bearer token are encrypted on the wire
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.oracle, self.backend, self.class_names = oracle, backend, class_names
        self.token, self.max_batch, self.max_body_bytes = token, max_batch, max_body_bytes
        self.model_lock = threading.Lock()  # models run one batch at a time

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "backend": self.backend, "classes": self.class_names, "max_batch": self.max_batch,
                "auth": bool(self.token)}

    def verify(self, request: Any) -> dict[str, Any]:
        batch = parse_verify_request(request, self.oracle.num_classes, self.max_batch)
        with self.model_lock:
            result = self.oracle.verify(batch)
        return verify_reply(result)

    def distribution(self, request: Any) -> dict[str, Any]:
        texts = parse_distribution_request(request, self.max_batch)
        with self.model_lock:
            q = np.asarray(self.oracle.distribution(texts), dtype=np.float64).reshape(len(texts), self.oracle.num_classes)
        return distribution_reply(q, is_distribution(q))


class _Handler(BaseHTTPRequestHandler):
    server: OracleService
    timeout = SOCKET_TIMEOUT_S
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") == "/health":
            self._send(200, self.server.health())
        else:
            self._error(WireError(404, "not_found", f"no route GET {self.path} (GET /health, POST /v1/verify, POST /v1/distribution)"))

    def do_POST(self) -> None:  # noqa: N802
        routes = {"/v1/verify": self.server.verify, "/v1/distribution": self.server.distribution}
        try:
            route = routes.get(self.path.rstrip("/"))
            if route is None:
                raise WireError(404, "not_found", f"no route POST {self.path} (POST /v1/verify, POST /v1/distribution)")
            self._authorize()
            request = self._read_json()
        except WireError as exc:
            self._error(exc)
            return
        try:
            self._send(200, route(request))
        except WireError as exc:
            self._error(exc)
        except Exception as exc:  # noqa: BLE001 - the backend failed: the caller can retry or fall back
            self._error(WireError(503, "backend_error", f"the {self.server.backend} backend failed: {type(exc).__name__}: {exc}"))

    def _method_not_allowed(self) -> None:
        self._error(WireError(405, "method_not_allowed", f"{self.command} is not supported (GET /health, POST /v1/...)"))

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed  # noqa: N815

    def _authorize(self) -> None:
        if not self.server.token:
            return
        given = self.headers.get("Authorization", "")
        if not given.startswith("Bearer "):
            raise WireError(401, "unauthorized", "this service needs 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(given[len("Bearer "):].encode(), self.server.token.encode()):
            raise WireError(401, "unauthorized", "wrong bearer token")

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise WireError(411, "length_required", "send a Content-Length header")
        if int(length) > self.server.max_body_bytes:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise WireError(413, "body_too_large", f"{length} bytes; this service takes at most {self.server.max_body_bytes}")
        body = self.rfile.read(int(length))
        try:
            return json.loads(body)
        except ValueError as exc:
            raise WireError(400, "invalid_json", f"the body is not JSON: {exc}") from None

    def _error(self, exc: WireError) -> None:
        self._send(exc.status, exc.body())

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quieter than http.server's default
        if os.environ.get("FEDHLM_ORACLE_ACCESS_LOG"):
            super().log_message(format, *args)


def server_tls(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server-side TLS context from a PEM certificate (chain) and its key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_service(backend: str, overrides: list[str], host: str, port: int, token: str,
                  max_batch: int = MAX_BATCH, max_body_bytes: int = MAX_BODY_BYTES,
                  tls: ssl.SSLContext | None = None) -> OracleService:
    """Validate the config, load the dataset's classes and the backend's model, bind the port."""
    from fedhlm_app.oracle.base import make_oracle
    from fedhlm_app.slm.local_data import dataset as configured_dataset
    from fedhlm_app.tools.launch import merged_config, with_default_paths

    cfg = validate(with_default_paths({**merged_config([], overrides), "oracle": backend}))
    dataset = configured_dataset(cfg)
    oracle = make_oracle(cfg, dataset)
    return OracleService((host, port), oracle, backend, list(dataset.class_names), token, max_batch, max_body_bytes, tls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="labels", choices=[b for b in BACKENDS if b != "remote"])
    parser.add_argument("-c", "--run-config", action="append", default=[], help="run-config overrides, e.g. \"oracle-model='x'\"")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8800)
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help="items per request")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
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
    try:
        tls = server_tls(args.tls_cert, args.tls_key) if args.tls_cert else None
        service = build_service(args.backend, args.run_config, args.host, args.port, token, args.max_batch,
                                args.max_body_bytes, tls)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"fedhlm oracle service: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=service.shutdown).start())
    print(f"fedhlm oracle service: backend {args.backend} on {service.url} "
          f"(classes {service.class_names}, bearer token {'required' if token else 'off'})", flush=True)
    try:
        service.serve_forever()
    except KeyboardInterrupt:
        pass
    service.server_close()
    service.oracle.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

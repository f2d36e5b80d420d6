"""The oracle service on loopback, driven over real HTTP, and the ``remote`` backend against it.

Failure cases are real: a killed service, a backend slower than the client's
timeout, a server that answers malformed JSON.
"""

import http.client
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from fedhlm_app.data.datasets import load_local
from fedhlm_app.oracle.base import EscalationBatch, LabelsOracle, Oracle, OracleError, verify_safely
from fedhlm_app.oracle.http import JSONClient
from fedhlm_app.oracle.remote import RemoteOracle
from fedhlm_app.oracle.service import Limits, OracleService
from fedhlm_app.paths import BUNDLED_DATA

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def dataset():
    return load_local(BUNDLED_DATA, "train.csv", "test.csv")


class Flaky(Oracle):
    """A backend that fails on texts containing FAIL and sleeps on texts containing SLOW."""

    def __init__(self, inner):
        super().__init__(inner.num_classes, seed=0)
        self.inner = inner

    def distribution(self, texts):
        if any("FAIL" in t for t in texts):
            raise RuntimeError("model crashed")
        if any("SLOW" in t for t in texts):
            time.sleep(2.0)
        return self.inner.distribution([t.replace("SLOW", "") for t in texts])


def _serve(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="module")
def service(dataset):
    with OracleService(Flaky(LabelsOracle(dataset, 0)), "labels", dataset.class_names, token=TOKEN,
                       limits=Limits(max_batch=8, max_body_bytes=64 * 1024, batch_window_ms=100)) as server:
        yield server


def _raw(server, method, path, body=b"", headers=None):
    """One HTTP request as bytes; returns (status, parsed JSON body)."""
    conn = http.client.HTTPConnection(*server.address, timeout=10)
    conn.request(method, path, body=body, headers=headers if headers is not None else {
        "Authorization": f"Bearer {TOKEN}", "Content-Length": str(len(body))})
    response = conn.getresponse()
    status, data = response.status, response.read()
    conn.close()
    return status, json.loads(data)


def _items(dataset, n, start=0):
    texts = dataset.test.texts[start : start + n]
    labels = dataset.test.labels[start : start + n]
    drafts = (labels + 1) % dataset.num_classes  # every draft wrong: the LLM must correct each one
    probs = np.full((n, dataset.num_classes), 0.1)
    probs[np.arange(n), drafts] = 1 - 0.1 * (dataset.num_classes - 1)
    return EscalationBatch(np.arange(n), texts, probs, drafts), labels


def _body(batch):
    return json.dumps({"texts": batch.texts, "probs": batch.probs.tolist(), "drafts": batch.drafts.tolist()}).encode()


def test_health_says_what_it_serves(service, dataset):
    status, body = _raw(service, "GET", "/health", headers={})
    assert status == 200 and body["status"] == "ok" and body["classes"] == dataset.class_names
    assert body["auth"] is True and body["max_batch"] == 8


def test_verify_corrects_wrong_drafts_over_http(service, dataset):
    batch, labels = _items(dataset, 5)
    status, body = _raw(service, "POST", "/v1/verify", _body(batch))
    assert status == 200
    assert body["answered"] == [True] * 5 and body["accepted"] == [False] * 5
    assert body["final"] == labels.tolist() and body["beta"] == [1.0] * 5
    assert np.allclose(body["q"], np.eye(dataset.num_classes)[labels])


@pytest.mark.parametrize(
    "body, headers, status, code",
    [
        (b"{not json", None, 400, "invalid_json"),
        (json.dumps({"texts": ["a"], "probs": [[0.5, 0.5]], "drafts": [0]}).encode(), None, 400, "bad_request"),
        (json.dumps({"texts": ["a"], "probs": [[0.9, 0.9, 0.1, 0.1]], "drafts": [0]}).encode(), None, 400, "bad_request"),
        (b'{"texts": ["a"], "probs": [[NaN, 0.5, 0.25, 0.25]], "drafts": [0]}', None, 400, "bad_request"),
        (json.dumps({"texts": ["a"] * 9, "probs": [[0.25] * 4] * 9, "drafts": [0] * 9}).encode(), None, 413, "batch_too_large"),
        (b"x" * (64 * 1024 + 1), None, 413, "body_too_large"),
        (b"{}", {"Content-Length": "2"}, 401, "unauthorized"),
        (b"{}", {"Content-Length": "2", "Authorization": "Bearer wrong"}, 401, "unauthorized"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(service, body, headers, status, code):
    got, reply = _raw(service, "POST", "/v1/verify", body, headers)
    assert got == status and reply["error"]["code"] == code and reply["error"]["message"]


def test_unknown_routes_methods_and_missing_length_are_4xx(service):
    assert _raw(service, "GET", "/v2/nothing", headers={})[0] == 404
    assert _raw(service, "POST", "/v1/unknown", b"{}")[0] == 404
    assert _raw(service, "PUT", "/v1/verify", b"{}")[0] == 405
    sock = socket.create_connection(service.address, timeout=10)
    sock.sendall(f"POST /v1/verify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    assert b" 411 " in sock.recv(4096).split(b"\r\n")[0]
    sock.close()


def test_a_failing_backend_is_a_503_not_a_500(service, dataset):
    batch, _ = _items(dataset, 2)
    status, body = _raw(service, "POST", "/v1/verify", _body(EscalationBatch(batch.ids, ["FAIL", "x"], batch.probs, batch.drafts)))
    assert status == 503 and body["error"]["code"] == "backend_error" and "model crashed" in body["error"]["message"]


def _remote(server_or_url, dataset, **kw):
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.url
    client = JSONClient(url, kw.pop("token", TOKEN), kw.pop("timeout", 10.0), kw.pop("retries", 1))
    return RemoteOracle(client, dataset.class_names, seed=0, batch_size=kw.pop("batch_size", 4))


def test_remote_backend_matches_the_local_oracle_and_counts_bytes(service, dataset):
    batch, labels = _items(dataset, 10)  # three requests of at most 4 items
    remote = _remote(service, dataset)
    remote.traffic.drain()  # the health check at start
    result = verify_safely(remote, batch)
    assert result.failed == 0 and result.final_classes(batch.drafts).tolist() == labels.tolist()
    traffic = remote.traffic.drain()
    assert traffic.requests == 3
    assert traffic.sent > len(_body(batch)) and traffic.received > 3 * 100
    assert np.allclose(remote.distribution(batch.texts), np.eye(dataset.num_classes)[labels])


def test_remote_failure_of_one_request_costs_only_its_items(service, dataset):
    batch, labels = _items(dataset, 8)
    texts = list(batch.texts)
    texts[5] = "FAIL"  # the second request (items 4-7) makes the backend fail
    result = verify_safely(_remote(service, dataset, retries=0), EscalationBatch(batch.ids, texts, batch.probs, batch.drafts))
    assert result.answered.tolist() == [True] * 4 + [False] * 4
    assert "503" in result.failure and "model crashed" in result.failure
    assert result.final_classes(batch.drafts).tolist() == labels[:4].tolist() + batch.drafts[4:].tolist()


def test_remote_times_out_instead_of_hanging(service, dataset):
    batch, _ = _items(dataset, 2)
    slow = EscalationBatch(batch.ids, ["SLOW" + t for t in batch.texts], batch.probs, batch.drafts)
    started = time.monotonic()
    result = verify_safely(_remote(service, dataset, timeout=0.5, retries=0), slow)
    assert result.failed == 2 and "timed out" in result.failure
    assert time.monotonic() - started < 1.9  # gave up before the backend answered


def test_killed_service_leaves_items_unanswered_after_retries(dataset):
    server = OracleService(LabelsOracle(dataset, 0), "labels", dataset.class_names).start()
    remote = _remote(server, dataset, token="", retries=2)
    batch, labels = _items(dataset, 3)
    assert verify_safely(remote, batch).failed == 0
    server.stop()  # the service is gone: connections are refused
    started = time.monotonic()
    result = verify_safely(remote, batch)
    assert result.failed == 3 and "failed after 3 attempts" in result.failure and "refused" in result.failure
    assert time.monotonic() - started >= 0.25 + 0.5  # backed off between attempts
    with pytest.raises(OracleError):
        remote.distribution(batch.texts)


class _Malformed(BaseHTTPRequestHandler):
    """A server that answers 200 with the wrong JSON, or not JSON at all."""

    def do_GET(self):  # noqa: N802
        self._reply(b'{"status": "ok", "classes": []}')

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self._reply(b'{"answered": [true]}' if self.path == "/v1/verify" else b"<html>oops</html>")

    def _reply(self, data):
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_malformed_replies_leave_items_unanswered(dataset):
    server = _serve(ThreadingHTTPServer(("127.0.0.1", 0), _Malformed))
    try:
        remote = _remote(f"http://127.0.0.1:{server.server_address[1]}", dataset, retries=0)
        batch, _ = _items(dataset, 3)
        result = verify_safely(remote, batch)
        assert result.failed == 3 and "malformed verify reply" in result.failure
        with pytest.raises(OracleError, match="not JSON"):
            remote.distribution(batch.texts)
    finally:
        server.shutdown()
        server.server_close()


def test_the_service_command_starts_serves_and_stops(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from fedhlm_app.tools.launch import free_port

    port = free_port()
    env = {**os.environ, "FEDHLM_ORACLE_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fedhlm_app.oracle.service", "--backend", "labels", "--port", str(port), "-c", "seed=3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        banner = proc.stdout.readline()
        assert f"backend labels on http://127.0.0.1:{port}" in banner and "bearer token required" in banner
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read())
        assert health["backend"] == "labels" and health["auth"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    bad = subprocess.run([*cmd[:-2], "-c", "oracle-timeout=-1"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "'oracle-timeout' = -1" in bad.stderr


def test_https_service_is_trusted_through_its_ca_only(tmp_path, dataset, monkeypatch):
    from fedhlm_app.tools.deploy.credentials import write_tls

    write_tls(tmp_path, ["127.0.0.1"])
    with OracleService(LabelsOracle(dataset, 0), "labels", dataset.class_names, token=TOKEN,
                       tls_cert=str(tmp_path / "server.pem"), tls_key=str(tmp_path / "server.key")) as server:
        assert server.url.startswith("https://127.0.0.1:")
        batch, labels = _items(dataset, 3)
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.crt"))  # how a ServerApp trusts a private CA
        trusted = verify_safely(_remote(server, dataset), batch)
        assert trusted.failed == 0 and trusted.final_classes(batch.drafts).tolist() == labels.tolist()
        monkeypatch.delenv("SSL_CERT_FILE")
        untrusted = verify_safely(_remote(server, dataset, retries=0), batch)
        assert untrusted.failed == 3 and "CERTIFICATE_VERIFY_FAILED" in untrusted.failure


def test_the_service_refuses_to_serve_beyond_loopback_without_a_token():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FEDHLM_ORACLE_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "fedhlm_app.oracle.service", "--host", "0.0.0.0", "--port", "1"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "set FEDHLM_ORACLE_TOKEN to serve on 0.0.0.0" in proc.stderr


def test_concurrent_requests_share_model_calls_and_a_failing_one_costs_only_itself(service, dataset):
    from concurrent.futures import ThreadPoolExecutor

    requests = []
    for i in range(8):
        batch, labels = _items(dataset, 3, start=3 * i)
        texts = ["FAIL"] + batch.texts[1:] if i == 5 else batch.texts
        requests.append((_body(EscalationBatch(batch.ids, texts, batch.probs, batch.drafts)), labels))
    before = _metrics(service)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda r: _raw(service, "POST", "/v1/verify", r[0]), requests))
    for i, ((status, body), (_, labels)) in enumerate(zip(replies, requests)):
        if i == 5:
            assert status == 503 and "model crashed" in body["error"]["message"]
        else:
            assert status == 200 and body["final"] == labels.tolist()  # its own items, not a neighbour's
    after = _metrics(service)
    assert after["calls"] - before["calls"] < after["requests"] - before["requests"]  # some requests shared a call
    assert after["retried_alone"] > before["retried_alone"]  # the call FAIL shared was re-run request by request


def _metrics(server):
    conn = http.client.HTTPConnection(*server.address, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()

    def value(name):
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name)

    return {"calls": value("fedhlm_oracle_model_batch_requests_count"), "requests": value("fedhlm_oracle_model_batch_requests_sum"),
            "retried_alone": value("fedhlm_oracle_requests_retried_alone_total"),
            "verify_200": sum(float(line.split()[-1]) for line in text.splitlines()
                              if line.startswith('fedhlm_oracle_requests_total{route="/v1/verify",status="200"}'))}


def test_metrics_count_requests_in_the_prometheus_format(service, dataset):
    before = _metrics(service)["verify_200"]
    batch, _ = _items(dataset, 2)
    assert _raw(service, "POST", "/v1/verify", _body(batch))[0] == 200
    assert _metrics(service)["verify_200"] == before + 1


def test_openapi_documents_the_endpoints(service):
    conn = http.client.HTTPConnection(*service.address, timeout=10)
    conn.request("GET", "/openapi.json")
    spec = json.loads(conn.getresponse().read())
    conn.close()
    assert {"/health", "/v1/verify", "/v1/distribution"} <= set(spec["paths"])
    assert set(spec["components"]["schemas"]["VerifyRequest"]["required"]) == {"texts", "probs", "drafts"}
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_a_full_queue_is_a_503_with_retry_after(dataset):
    from concurrent.futures import ThreadPoolExecutor

    limits = Limits(max_waiting=1, batch_window_ms=0)
    with OracleService(Flaky(LabelsOracle(dataset, 0)), "labels", dataset.class_names, limits=limits) as server:
        batch, _ = _items(dataset, 1)
        slow = _body(EscalationBatch(batch.ids, ["SLOW" + batch.texts[0]], batch.probs, batch.drafts))

        def post(body):
            conn = http.client.HTTPConnection(*server.address, timeout=10)
            conn.request("POST", "/v1/verify", body=body, headers={"Content-Length": str(len(body))})
            response = conn.getresponse()
            return response.status, response.getheader("Retry-After"), json.loads(response.read())

        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(post, slow)  # the model is busy with this one for 2 s
            time.sleep(0.5)
            waiting = pool.submit(post, _body(batch))  # queued
            time.sleep(0.2)
            refused = post(_body(batch))  # no room left
            assert refused[0] == 503 and refused[1] == "1" and refused[2]["error"]["code"] == "overloaded"
            assert first.result()[0] == 200 and waiting.result()[0] == 200

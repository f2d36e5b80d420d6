"""The oracle service under load and abuse, on loopback: the service command with TLS and a token.

20 idle TCP connections and 10 slow clients (a byte per second) stay open while 50
callers send 20 verify requests each. Every request must get an answer or a 4xx/5xx
(none lost, none hanging), each caller must get its own answers, and /health must
answer in under 200 ms throughout. Prints the /health latency percentiles and how
many model calls the requests shared (dynamic batching).
"""

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from fedhlm_app.data.datasets import load_local
from fedhlm_app.paths import BUNDLED_DATA
from fedhlm_app.tools.deploy.credentials import write_tls
from fedhlm_app.tools.launch import free_port

TOKEN = "load-test-token"
IDLE, SLOW, CALLERS, REQUESTS = 20, 10, 50, 20
HEALTH_LIMIT_S = 1.0  # a stalled service takes seconds (asyncio's TLS shutdown: 30 s); a busy 2-core CPU, tenths


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The service command serving HTTPS on a free loopback port: (base URL, TLS context trusting its CA)."""
    folder = tmp_path_factory.mktemp("tls")
    write_tls(folder, ["127.0.0.1"])
    port = free_port()
    env = {**os.environ, "FEDHLM_ORACLE_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fedhlm_app.oracle.service", "--backend", "labels", "--port", str(port),
                             "--tls-cert", str(folder / "server.pem"), "--tls-key", str(folder / "server.key")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        assert "backend labels on https://127.0.0.1" in proc.stdout.readline()
        yield f"https://127.0.0.1:{port}", ssl.create_default_context(cafile=str(folder / "ca.crt"))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stdout.read()


def _idle_connections(port, n):
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]


def _slow_client(port, tls, stop, outcome):
    """Completes the TLS handshake, then sends a request one byte per second until told to stop."""
    request = f"POST /v1/verify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100000\r\n\r\n" + "x" * 100
    try:
        with tls.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="127.0.0.1") as sock:
            for byte in request.encode():
                if stop.wait(1.0):
                    break
                sock.sendall(bytes([byte]))
            outcome.append("open")
    except OSError as exc:  # the service may close a connection it will not serve: also fine, if it says so
        outcome.append(f"closed: {exc}")


def _health_prober(url, tls, stop, latencies):
    with httpx.Client(verify=tls, timeout=10) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                ok = client.get(url + "/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - started if ok else float("inf"))
            time.sleep(0.02)


def _caller(url, tls, dataset, caller):
    """REQUESTS verify requests of 1-8 items with wrong drafts: (statuses, items whose final class is not their label)."""
    rng = np.random.default_rng(caller)
    statuses, wrong = [], 0
    with httpx.Client(verify=tls, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        for _ in range(REQUESTS):
            idx = rng.choice(len(dataset.test.texts), size=int(rng.integers(1, 9)), replace=False)
            labels = dataset.test.labels[idx]
            drafts = (labels + 1) % dataset.num_classes
            probs = np.full((len(idx), dataset.num_classes), 0.1)
            probs[np.arange(len(idx)), drafts] = 0.7
            body = {"texts": [dataset.test.texts[i] for i in idx], "probs": probs.tolist(), "drafts": drafts.tolist()}
            reply = client.post(url + "/v1/verify", json=body)
            statuses.append(reply.status_code)
            if reply.status_code == 200:
                wrong += int(np.sum(np.array(reply.json()["final"]) != labels))
    return statuses, wrong


def test_idle_and_slow_clients_do_not_stop_the_service_under_load(service):
    url, tls = service
    port = int(url.rsplit(":", 1)[1])
    dataset = load_local(BUNDLED_DATA, "train.csv", "test.csv")
    idle = _idle_connections(port, IDLE)
    stop, latencies, slow_outcomes = threading.Event(), [], []
    slow = [threading.Thread(target=_slow_client, args=(port, tls, stop, slow_outcomes)) for _ in range(SLOW)]
    prober = threading.Thread(target=_health_prober, args=(url, tls, stop, latencies))
    for thread in [*slow, prober]:
        thread.start()
    try:
        time.sleep(1.0)  # the idle and slow connections are in place before the load starts
        started = time.perf_counter()
        with ThreadPoolExecutor(CALLERS) as pool:
            results = list(pool.map(lambda c: _caller(url, tls, dataset, c), range(CALLERS)))
        load_s = time.perf_counter() - started
    finally:
        stop.set()
        for thread in [*slow, prober]:
            thread.join(timeout=30)
        for sock in idle:
            sock.close()
    statuses = [s for caller_statuses, _ in results for s in caller_statuses]
    assert len(statuses) == CALLERS * REQUESTS  # none lost: a request that raised would have failed its caller
    assert all(s == 200 or 400 <= s < 600 for s in statuses)
    assert statuses.count(200) == len(statuses), sorted(set(statuses))  # nothing here is worth refusing
    assert sum(wrong for _, wrong in results) == 0  # every caller got its own items' answers
    assert len(slow_outcomes) == SLOW
    assert latencies and np.isfinite(latencies).all(), "a /health probe failed"
    p50, p99 = np.percentile(latencies, [50, 99])
    metrics = httpx.get(url + "/metrics", verify=tls).text
    model_calls = _metric(metrics, "fedhlm_oracle_model_batch_requests_count")
    shared = _metric(metrics, "fedhlm_oracle_model_batch_requests_sum")
    print(f"\nload: {len(statuses)} requests in {load_s:.1f} s ({len(statuses) / load_s:.0f}/s) with {IDLE} idle and {SLOW} slow "
          f"connections open; /health over {len(latencies)} probes: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms; {shared:.0f} requests shared {model_calls:.0f} model calls")
    print(json.dumps({"requests": len(statuses), "load_s": load_s, "health_p50_ms": p50 * 1000, "health_p99_ms": p99 * 1000,
                      "health_max_ms": max(latencies) * 1000, "model_calls": model_calls}))
    assert max(latencies) < HEALTH_LIMIT_S
    assert model_calls < shared  # requests that arrived together shared a model call


def _metric(text, name):
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))

"""The ``openai`` backend's HTTP behaviour against a real OpenAI-compatible HTTP server on loopback
(a scripted chat-completions endpoint on uvicorn): pooled connections, Retry-After, bytes booked, the breaker."""

import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from fedhlm_app.oracle.base import CircuitBreaker
from fedhlm_app.oracle.openai_chat import OpenAIChatOracle
from fedhlm_app.oracle.prompts import LabelPrompt

CLASSES = ["World", "Sports", "Business", "Sci/Tech"]


class ChatServer:
    """Answers each text's label by name; the first ``throttle`` requests get a 429 with Retry-After."""

    def __init__(self, throttle=0, retry_after_s=1, fail=False):
        self.throttle, self.retry_after_s, self.fail = throttle, retry_after_s, fail
        self.requests, self.client_ports, self.times = 0, set(), []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def complete(request: Request):
            body = await request.json()
            self.requests += 1
            self.client_ports.add(request.client.port)  # one port per TCP connection
            self.times.append(time.monotonic())
            if self.fail:
                return JSONResponse({"error": {"message": "model down"}}, status_code=500)
            if self.requests <= self.throttle:
                return JSONResponse({"error": {"message": "slow down"}}, status_code=429,
                                    headers={"Retry-After": str(self.retry_after_s)})
            label = next(c for c in CLASSES if c in body["messages"][-1]["content"])
            return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": label}}]}

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws="none"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *_):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _oracle(url, tmp_path, concurrency=2, retries=2, breaker_limit=3):
    return OpenAIChatOracle(url, "", "m", LabelPrompt(CLASSES, []), seed=0, cache_dir=str(tmp_path), concurrency=concurrency,
                            batch_size=64, timeout=10.0, retries=retries, breaker=CircuitBreaker(breaker_limit))


def _texts(n):
    return [f"item {i} about {CLASSES[i % 4]}" for i in range(n)]


def test_requests_reuse_pooled_connections_and_every_byte_is_booked(tmp_path):
    with ChatServer() as server:
        oracle = _oracle(server.url, tmp_path, concurrency=2)
        try:
            q = oracle.distribution(_texts(12))
        finally:
            oracle.close()
    assert np.array_equal(q.argmax(axis=1), np.arange(12) % 4)
    assert server.requests == 12 and len(server.client_ports) <= 2  # two connections carried twelve requests
    traffic = oracle.traffic.drain()
    assert traffic.requests == 12 and traffic.sent > 12 * 200 and traffic.received > 12 * 150


def test_a_429_is_retried_after_the_time_the_server_asks_and_each_attempt_is_booked(tmp_path):
    with ChatServer(throttle=1, retry_after_s=1) as server:
        oracle = _oracle(server.url, tmp_path, concurrency=1)
        try:
            q = oracle.distribution(_texts(1))
        finally:
            oracle.close()
    assert q.argmax(axis=1).tolist() == [0]
    assert server.requests == 2 and server.times[1] - server.times[0] >= 0.95  # waited the Retry-After second
    assert oracle.traffic.drain().requests == 2


def test_a_failing_server_opens_the_breaker_instead_of_being_asked_for_every_item(tmp_path):
    with ChatServer(fail=True) as server:
        oracle = _oracle(server.url, tmp_path, concurrency=1, retries=0, breaker_limit=3)
        try:
            q = oracle.distribution(_texts(10))
        finally:
            oracle.close()
    assert np.isnan(q).all() and server.requests == 3
    assert "Error code: 500 - model down" in oracle.last_failure


@pytest.mark.parametrize("concurrency", [1, 4])
def test_concurrency_bounds_the_requests_in_flight(tmp_path, concurrency):
    with ChatServer() as server:
        oracle = _oracle(server.url, tmp_path, concurrency=concurrency)
        try:
            oracle.distribution(_texts(8))
        finally:
            oracle.close()
    assert len(server.client_ports) <= concurrency

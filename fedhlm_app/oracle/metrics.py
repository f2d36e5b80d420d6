"""The oracle service's ``/metrics``: requests, items, latency, model batches, failures (Prometheus text format)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTES = ("/health", "/v1/verify", "/v1/distribution", "/metrics")
CONTENT_TYPE = CONTENT_TYPE_LATEST
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    """One service's counters, in their own registry (several services may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fedhlm_oracle_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("fedhlm_oracle_request_seconds", "time to answer a request", ["route"], registry=r)
        self.items = Counter("fedhlm_oracle_items", "items received in verify and distribution requests", ["route"], registry=r)
        self.batches = Histogram("fedhlm_oracle_model_batch_items", "items per model call (dynamic batches)",
                                 buckets=BATCH_BUCKETS, registry=r)
        self.jobs_per_batch = Histogram("fedhlm_oracle_model_batch_requests", "requests sharing one model call",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.retried_alone = Counter("fedhlm_oracle_requests_retried_alone",
                                     "requests re-run on their own after the model call they shared failed", registry=r)
        self.failures = Counter("fedhlm_oracle_backend_failures", "requests answered 503 because the backend failed", registry=r)
        self.waiting = Gauge("fedhlm_oracle_waiting_requests", "requests queued for or in the model", registry=r)
        self.posts_in_flight = 0  # verify and distribution requests being received, queued, run or answered
        Gauge("fedhlm_oracle_requests_in_flight", "POST requests being received, queued, run or answered",
              registry=r).set_function(lambda: self.posts_in_flight)

    def request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"  # unknown paths must not grow the label set
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def batch(self, items: int, requests: int, retried_alone: int) -> None:
        self.batches.observe(items)
        self.jobs_per_batch.observe(requests)
        self.retried_alone.inc(retried_alone)

    def render(self) -> bytes:
        return generate_latest(self.registry)

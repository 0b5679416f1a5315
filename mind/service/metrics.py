"""``GET /metrics``: the service's Prometheus metrics (text exposition format, prometheus_client).

Each app has its own registry (several apps in one process, as in the tests, do not share counts):

* ``mind_serve_requests_total{route, status}``        requests answered, by route and HTTP status
* ``mind_serve_request_seconds{route}``               histogram of the time from request to answer
* ``mind_serve_batch_users``                          histogram of the users per model call (1 = no batching)
* ``mind_serve_queue_users``                          users waiting for the batch worker now
* ``mind_serve_model_info{model, format, folder, index}``  1 for the model serving now (its export id)
* ``mind_serve_reloads_total{result}``                hot swaps: ok, refused (a 4xx) or error

``route`` is one of the service's routes, or ``other`` for any unknown path (so a scan of random
paths cannot grow the label set).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The service's metrics in their own registry."""

    def __init__(self):
        disable_created_metrics()   # no *_created series: half the text, nothing a dashboard reads
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("mind_serve_requests", "Requests answered, by route and HTTP status",
                                ("route", "status"), registry=r)
        self.latency = Histogram("mind_serve_request_seconds", "Time from request to answer", ("route",),
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_users = Histogram("mind_serve_batch_users", "Users per model call (dynamic batching)",
                                     buckets=BATCH_BUCKETS, registry=r)
        self.queue_users = Gauge("mind_serve_queue_users", "Users waiting for the batch worker", registry=r)
        self.model_info = Gauge("mind_serve_model_info", "1 for the export serving now",
                                ("model", "format", "folder", "index"), registry=r)
        self.reloads = Counter("mind_serve_reloads", "Hot swaps by result (ok, refused, error)", ("result",),
                               registry=r)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def set_model(self, state) -> None:
        """Label the serving model (and drop the previous one's series)."""
        self.model_info.clear()
        self.model_info.labels(state.model_id, str(state.meta.get("format")), str(state.folder), state.index).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)

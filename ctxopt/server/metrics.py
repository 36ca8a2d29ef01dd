"""The gateway's Prometheus metrics, in a registry of its own (two gateways in one process keep apart counts).

Per method (the method a request ran with; ``invalid`` for a request refused before one was chosen):
requests by HTTP status, errors by type, prompt tokens before and after compression, tokens saved, completion
tokens, and histograms of the whole request, of the time to the first answer text and of ctxopt's own
preparation (retrieval, compression, the template). Gauges: requests admitted (running or queued) and the limit.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
INVALID = "invalid"


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("ctxopt_requests", "Chat completion requests, by method and HTTP status "
                                "(499: the client went away first).", ["method", "status"], registry=registry)
        self.errors = Counter("ctxopt_request_errors", "Requests that ended in an error, by method and error type.",
                              ["method", "type"], registry=registry)
        self.prompt_tokens_original = Counter(
            "ctxopt_prompt_tokens_original", "Prompt tokens before compression (the whole context in the template).",
            ["method"], registry=registry)
        self.prompt_tokens = Counter("ctxopt_prompt_tokens", "Prompt positions the generator prefilled after "
                                     "compression.", ["method"], registry=registry)
        self.tokens_saved = Counter("ctxopt_tokens_saved", "Prompt tokens compression removed.", ["method"],
                                    registry=registry)
        self.completion_tokens = Counter("ctxopt_completion_tokens", "Answer tokens generated.", ["method"],
                                         registry=registry)
        self.latency = Histogram("ctxopt_request_seconds", "Seconds from a request's arrival to its last byte.",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("ctxopt_time_to_first_token_seconds", "Seconds from a request's arrival to the "
                              "first answer text.", ["method"], buckets=LATENCY_BUCKETS, registry=registry)
        self.prepare = Histogram("ctxopt_prepare_seconds", "Seconds of ctxopt's own work before generation "
                                 "(retrieval, compression, the template).", ["method"], buckets=LATENCY_BUCKETS,
                                 registry=registry)
        self.queue_wait = Histogram("ctxopt_queue_seconds", "Seconds a request waited for a worker.", ["method"],
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.admitted = Gauge("ctxopt_requests_admitted", "Requests running or waiting for a worker.",
                              registry=registry)
        self.admit_limit = Gauge("ctxopt_requests_admitted_limit", "Requests admitted at most; more get 429.",
                                 registry=registry)

    def answered(self, method: str, seconds: float, ttft: float | None, prepare: float | None, queued: float | None,
                 original: int, prefilled: int, generated: int) -> None:
        self.requests.labels(method, "200").inc()
        self.latency.labels(method).observe(seconds)
        if ttft is not None:
            self.ttft.labels(method).observe(ttft)
        if prepare is not None:
            self.prepare.labels(method).observe(prepare)
        if queued is not None:
            self.queue_wait.labels(method).observe(queued)
        self.prompt_tokens_original.labels(method).inc(original)
        self.prompt_tokens.labels(method).inc(prefilled)
        self.tokens_saved.labels(method).inc(max(0, original - prefilled))
        self.completion_tokens.labels(method).inc(generated)

    def failed(self, method: str, status: int, kind: str) -> None:
        self.requests.labels(method, str(status)).inc()
        self.errors.labels(method, kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

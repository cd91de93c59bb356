"""Prometheus metrics of one server (its own registry, so several apps can live in one process, e.g. in tests)."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)


class ServeMetrics:
    """Requests, tokens, time to first token and time per output token (labelled ``fusion="fused"|"unfused"``),
    errors, queue depth and batch sizes."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, info: dict[str, str], queue_depth: Callable[[], int], running: Callable[[], int]) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("detox_serve_requests", "HTTP requests by endpoint and outcome (status code or 'cancelled')",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("detox_serve_errors", "Error responses by OpenAI error code", ["code"], registry=r)
        self.prompt_tokens = Counter("detox_serve_prompt_tokens", "Prompt tokens of served requests", ["fusion"], registry=r)
        self.completion_tokens = Counter("detox_serve_completion_tokens", "Generated tokens", ["fusion"], registry=r)
        self.ttft = Histogram("detox_serve_time_to_first_token_seconds", "From arrival to the first generated token",
                              ["fusion"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("detox_serve_time_per_output_token_seconds",
                              "Per request: (last token − first token) / (tokens − 1)", ["fusion"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("detox_serve_batch_rows", "Sequences decoded together in one batch", ["fusion"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        Gauge("detox_serve_queue_depth", "Requests waiting for the model", registry=r).set_function(queue_depth)
        Gauge("detox_serve_running_requests", "Requests being decoded now", registry=r).set_function(running)
        Gauge("detox_serve_info", "The served model and calibrator", list(info), registry=r).labels(**info).set(1)

    def observe_request(self, endpoint: str, status: str) -> None:
        self.requests.labels(endpoint, status).inc()

    def observe_batch(self, jobs: list[Any]) -> None:
        """A batch starts: its rows (every job of a batch shares the fusion setting)."""
        self.batch_rows.labels(_fusion(jobs[0])).observe(sum(j.request.n for j in jobs))

    def observe_job(self, job: Any) -> None:
        """Tokens and timings of a finished job (called by the worker, so the counts are final)."""
        fusion = _fusion(job)
        self.prompt_tokens.labels(fusion).inc(len(job.request.prompt_ids))
        self.completion_tokens.labels(fusion).inc(job.completion_tokens)
        if job.first_token is not None:
            self.ttft.labels(fusion).observe(job.first_token - job.enqueued)
            if job.completion_tokens > 1 and job.request.n == 1:
                self.tpot.labels(fusion).observe((job.last_token - job.first_token) / (job.completion_tokens - 1))

    def observe_error(self, endpoint: str, status: int, code: str) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.errors.labels(code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _fusion(job: Any) -> str:
    return "unfused" if job.request.strength is None else "fused"

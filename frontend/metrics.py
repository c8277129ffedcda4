"""/metrics: vLLM's metric names, labels and histogram buckets, under the `vlmserve:` prefix.

Two sources, one exposition:

- Per-request metrics (latencies, token counts, finish reasons, images) are observed by the
  frontend that served the request. Gunicorn runs several frontends, so they live in
  prometheus-client's multiprocess mode: each worker writes its own files under
  PROMETHEUS_MULTIPROC_DIR (set up by deploy/gunicorn_conf.py) and the worker that answers a
  scrape adds every worker's files up, dead workers' included.
- Engine state (queues, KV cache, preemptions, prefix and encoder caches) is known only to the
  scheduler, which already publishes an EngineStatus to every frontend twice a second. The
  answering worker turns its latest one into gauges and counters at scrape time
  (EngineCollector): one value per scrape, never a sum over workers that all heard the same
  status, and no second port for Prometheus to scrape.

Dashboards written for vLLM work after replacing `vllm:` with `vlmserve:`
(deploy/grafana/vlmserve.json is ours). The labels are vLLM's `model_name` (and
`finished_reason` on request_success).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from vlmserve.frontend.scheduler_client import SchedulerClient
from vlmserve.shared.messages import QUEUE_TIME_BUCKETS, EngineStatus

PREFIX = "vlmserve:"

# vLLM's buckets (vllm/v1/metrics/loggers.py), so the same dashboards and SLO thresholds apply.
TTFT_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
]  # fmt: skip
ITL_BUCKETS = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
]  # fmt: skip
REQUEST_LATENCY_BUCKETS = list(QUEUE_TIME_BUCKETS)  # the scheduler observes queue times
# Ours (vLLM has no image metrics): fetch, decode and the processor of one request's images.
IMAGE_SECONDS_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
IMAGE_COUNT_BUCKETS = [0, 1, 2, 4, 8, 16, 32]


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count buckets)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class EngineCollector(Collector):
    """The scheduler's state, as the latest EngineStatus this frontend heard says."""

    def __init__(self, model_name: str, engine: SchedulerClient) -> None:
        self.model_name = model_name
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.status
        total = s.total_blocks if s else 0
        free = s.free_blocks if s else 0

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            return family

        yield gauge("engine_alive", "1 while the scheduler and every worker run", self.engine.alive)
        if s is None:
            # Not heard from the scheduler yet (this worker just started): no engine figures
            # rather than zeros, which Prometheus would read as counters reset.
            return
        yield gauge("num_requests_running", "Requests in the running batch.", _of(s, "num_running"))
        yield gauge(
            "num_requests_waiting", "Requests waiting to be scheduled.", _of(s, "num_waiting")
        )
        yield gauge(
            "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
            1 - free / total if total else 0.0,
        )  # fmt: skip
        yield gauge("kv_cache_free_blocks", "KV-cache blocks no running request holds.", free)
        yield gauge("kv_cache_total_blocks", "KV-cache blocks in all.", total)
        queries, hits = _of(s, "prefix_cache_queries"), _of(s, "prefix_cache_hits")
        yield counter("prefix_cache_queries", "Prefix cache queries, in prompt tokens.", queries)
        yield counter("prefix_cache_hits", "Prefix cache hits, in prompt tokens.", hits)
        yield gauge(
            "prefix_cache_hit_rate", "Prefix cache hits over queries (tokens) since start.",
            hits / queries if queries else 0.0,
        )  # fmt: skip
        queries, hits = _of(s, "encoder_cache_queries"), _of(s, "encoder_cache_hits")
        yield counter("encoder_cache_queries", "Vision encoder cache lookups, in images.", queries)
        yield counter("encoder_cache_hits", "Vision encoder cache hits, in images.", hits)
        yield gauge(
            "encoder_cache_hit_rate", "Encoder cache hits over lookups (images) since start.",
            hits / queries if queries else 0.0,
        )  # fmt: skip
        yield counter("num_preemptions", "Cumulative number of preemptions.", _of(s, "preemptions"))
        yield counter("engine_steps", "Engine steps run.", _of(s, "steps"))
        yield queue_time(self.model_name, s)
        yield counter(
            "engine_step_seconds", "Seconds the workers spent in steps.", _of(s, "step_s")
        )


def queue_time(model_name: str, status: EngineStatus | None) -> HistogramMetricFamily:
    """The scheduler's queue-time histogram (it alone sees a request wait and get admitted)."""
    counts = list(status.queue_time_counts) if status and status.queue_time_counts else []
    counts += [0] * (len(QUEUE_TIME_BUCKETS) + 1 - len(counts))
    running, buckets = 0, []
    for bound, count in zip([*QUEUE_TIME_BUCKETS, float("inf")], counts, strict=True):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else str(bound), running))
    family = HistogramMetricFamily(
        PREFIX + "request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        labels=["model_name"],
    )
    family.add_metric([model_name], buckets, _of(status, "queue_time_sum"))
    return family


def _of(status: object, field: str) -> float:
    return getattr(status, field) if status is not None else 0


class FrontendMetrics:
    """This frontend's per-request metrics and the registry /metrics exposes.

    Made once per app; the metric objects are bound to the served model's label so callers
    just observe. In multiprocess mode they are registered nowhere (their files are the
    registry); otherwise (one process, tests) in this object's own registry.
    """

    def __init__(self, model_name: str, max_model_len: int, engine: SchedulerClient) -> None:
        self.registry = CollectorRegistry()
        target: CollectorRegistry | None = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            MultiProcessCollector(self.registry)
            target = None
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: list) -> Histogram:
            metric = Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=target)
            return metric.labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=target).labels(model_name)

        tokens = build_1_2_5_buckets(max_model_len)
        self.ttft = histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )  # fmt: skip
        self.itl = histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )  # fmt: skip
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )  # fmt: skip
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Number of prefill tokens processed.", tokens
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Number of generation tokens processed.", tokens
        )
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "generation_tokens", "Number of generation tokens processed."
        )
        self.request_success = Counter(
            PREFIX + "request_success",
            "Count of finished requests (each of n choices is one) by finish reason.",
            [*labels, "finished_reason"],
            registry=target,
        )
        self.requests = Counter(
            PREFIX + "http_requests",
            "Generation requests answered, by HTTP status (499: the client went away).",
            [*labels, "status"],
            registry=target,
        )
        self.images = counter("images", "Images received in requests.")
        self.request_images = histogram(
            "request_images", "Images per request that had any.", IMAGE_COUNT_BUCKETS
        )
        self.image_seconds = histogram(
            "image_preprocessing_seconds",
            "Seconds to fetch, decode and preprocess one request's images (and render its prompt).",
            IMAGE_SECONDS_BUCKETS,
        )
        self.model_name = model_name
        self.registry.register(EngineCollector(model_name, engine))

    def success(self, reason: str) -> None:
        self.request_success.labels(self.model_name, reason).inc()

    def answered(self, status: int) -> None:
        self.requests.labels(self.model_name, str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

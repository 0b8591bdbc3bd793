"""Prometheus metrics, observed at the edges of the layers (HTTP middleware, scheduler batch hook).

Each app owns its registry (no global state): two apps in one process do not share counters.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from rankserve.cache import CacheStats, ScoreCache
from rankserve.engines.base import EngineInfo
from rankserve.scheduler import BatchStats

# Seconds: from sub-millisecond (tiny checkpoint, cache-warm) to a minute (long requests on a CPU).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "rankserve_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "rankserve_request_duration_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge("rankserve_requests_in_flight", "inference requests being served", registry=r)
        self.rejections = Counter("rankserve_rejections", "requests refused, by reason", ["reason"], registry=r)
        self.passages = Counter("rankserve_passages", "passages scored", registry=r)
        self.tokens = Counter("rankserve_prompt_tokens", "tokens scored (after truncation)", registry=r)
        self.queue_tokens = Gauge("rankserve_queue_tokens", "tokens waiting for the engine", registry=r)
        self.batch_size = Histogram(
            "rankserve_batch_size", "sequences per engine batch", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "rankserve_batch_padded_tokens", "padded tokens per engine batch", buckets=TOKEN_BUCKETS, registry=r
        )
        self.real_tokens = Counter("rankserve_batch_real_tokens", "real tokens computed by the engine", registry=r)
        self.padded_tokens = Counter(
            "rankserve_batch_computed_tokens", "tokens computed by the engine, padding included", registry=r
        )
        self.queue_seconds = Histogram(
            "rankserve_queue_duration_seconds", "wait before a batch starts", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "rankserve_inference_duration_seconds", "engine time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_failures = Counter("rankserve_batch_failures", "engine batches that failed", registry=r)
        self.engine_info = Info("rankserve_engine", "the engine in use", registry=r)
        self.cache = CacheCollector()
        r.register(self.cache)

    def set_engine(self, info: EngineInfo, model_id: str) -> None:
        self.engine_info.info(
            {"backend": info.backend, "device": info.device, "precision": info.precision, "model": model_id}
        )

    def observe_cache(self, cache: ScoreCache | None) -> None:
        """Export this score cache's counters (read at scrape time: nothing is added to the request path)."""
        self.cache.cache = cache

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_tokens.observe(stats.padded_tokens)
        self.real_tokens.inc(stats.real_tokens)
        self.padded_tokens.inc(stats.padded_tokens)
        self.queue_seconds.observe(stats.queue_seconds)
        self.inference_seconds.observe(stats.compute_seconds)
        if not stats.ok:
            self.batch_failures.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CacheCollector(Collector):
    """The score cache's own counters, as Prometheus metrics (all zero while there is no cache)."""

    def __init__(self) -> None:
        self.cache: ScoreCache | None = None

    def collect(self) -> Iterator[Metric]:
        s = self.cache.stats() if self.cache is not None else CacheStats(0, 0, 0, 0, 0)
        yield CounterMetricFamily("rankserve_cache_hits", "score cache lookups that found the pair", value=s.hits)
        yield CounterMetricFamily("rankserve_cache_misses", "score cache lookups that did not", value=s.misses)
        yield CounterMetricFamily("rankserve_cache_evictions", "scores dropped to stay in bound", value=s.evictions)
        yield GaugeMetricFamily("rankserve_cache_entries", "scores held in the cache", value=s.entries)
        yield GaugeMetricFamily("rankserve_cache_max_entries", "the cache's bound (0: off)", value=s.max_entries)

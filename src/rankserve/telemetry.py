"""Prometheus metrics, observed at the edges of the layers (HTTP middleware, scheduler batch hook, values read at
scrape time). docs/observability.md lists them.

Each app owns its registry (no global state): two apps in one process do not share counters.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from rankserve.cache import CacheStats, ScoreCache
from rankserve.engines.base import EngineInfo
from rankserve.scheduler import BatchStats

log = logging.getLogger(__name__)

# Seconds: from a millisecond (a GPU batch, a cache hit) to two minutes (512 long passages on a CPU), about
# three buckets per decade where GPU requests fall (10 ms - 1 s).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75,
    1, 1.5, 2.5, 5, 10, 20, 30, 60, 120,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 262144)
PADDING_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)

# Route template → API dialect (the `dialect` label). Jina's API is Cohere v1's route: it counts as cohere.
DIALECTS = {
    "/v1/ranking": "nim",
    "/v1/retrieval/nvidia/{slug}/reranking": "nim",
    "/v1/rerank": "cohere",
    "/v2/rerank": "cohere",
    "/rerank": "tei",
}


def dialect_of(route: str) -> str:
    return DIALECTS.get(route, "other")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "rankserve_requests",
            "HTTP requests by route template, API dialect and status code",
            ["route", "dialect", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "rankserve_request_duration_seconds",
            "HTTP request latency, arrival to last byte sent",
            ["route", "dialect"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenize_seconds = Histogram(
            "rankserve_tokenization_duration_seconds",
            "tokenizer time per inference request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("rankserve_requests_in_flight", "inference requests being served", registry=r)
        self.rejections = Counter("rankserve_rejections", "requests refused, by reason", ["reason"], registry=r)
        self.passages = Counter("rankserve_passages", "passages scored", registry=r)
        self.tokens = Counter("rankserve_prompt_tokens", "tokens scored (after truncation)", registry=r)
        self.queue_tokens = Gauge("rankserve_queue_tokens", "tokens waiting for the engine", registry=r)
        self.queue_depth = Gauge("rankserve_queue_depth", "sequences waiting for the engine", registry=r)
        self.batch_size = Histogram(
            "rankserve_batch_size", "sequences per engine batch", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "rankserve_batch_padded_tokens", "padded tokens per engine batch", buckets=TOKEN_BUCKETS, registry=r
        )
        self.padding_efficiency = Histogram(
            "rankserve_padding_efficiency",
            "real tokens / computed (padded) tokens per engine batch",
            buckets=PADDING_BUCKETS,
            registry=r,
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
        self.gpu = GpuMemoryCollector()
        r.register(self.gpu)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...

    def set_engine(self, info: EngineInfo, model_id: str) -> None:
        self.engine_info.info(
            {"backend": info.backend, "device": info.device, "precision": info.precision, "model": model_id}
        )
        self.gpu.device = info.device

    def observe_cache(self, cache: ScoreCache | None) -> None:
        """Export this score cache's counters (read at scrape time: nothing is added to the request path)."""
        self.cache.cache = cache

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_tokens.observe(stats.padded_tokens)
        self.real_tokens.inc(stats.real_tokens)
        self.padded_tokens.inc(stats.padded_tokens)
        if stats.padded_tokens:
            self.padding_efficiency.observe(stats.real_tokens / stats.padded_tokens)
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


class GpuMemoryCollector(Collector):
    """`rankserve_gpu_memory_bytes{device,kind}` read at scrape time from PyTorch's CUDA allocator: `allocated`
    (tensors), `reserved` (held by the allocator) and `total` (the device). Only when the engine is on CUDA and
    PyTorch is already loaded (never imported here)."""

    def __init__(self) -> None:
        self.device: str | None = None
        self._warned = False

    def collect(self) -> Iterator[Metric]:
        device = self.device
        torch = sys.modules.get("torch")
        if device is None or not device.startswith("cuda") or torch is None:
            return
        try:
            index = torch.device(device).index
            index = torch.cuda.current_device() if index is None else index
            name = f"cuda:{index}"
            values = {
                "allocated": torch.cuda.memory_allocated(index),
                "reserved": torch.cuda.memory_reserved(index),
                "total": torch.cuda.get_device_properties(index).total_memory,
            }
        except Exception:  # a scrape must not fail because the device is in a bad state
            if not self._warned:  # once, not at every scrape
                self._warned = True
                log.warning(
                    "cannot read GPU memory for %s; rankserve_gpu_memory_bytes is left out", device, exc_info=True
                )
            return
        family = GaugeMetricFamily(
            "rankserve_gpu_memory_bytes", "GPU memory by kind: allocated, reserved, total", labels=["device", "kind"]
        )
        for kind, value in values.items():
            family.add_metric([name, kind], float(value))
        yield family

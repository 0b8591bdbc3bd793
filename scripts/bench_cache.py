#!/usr/bin/env python3
"""Score cache: hit rate on a RAG-like stream, passages/s with the cache off vs on, and its cost when nothing repeats.

The stream (seeded):
- a corpus of 20,000 passages (lorem-like words, lengths lognormal, median 48 words, clipped to 16-256);
- 100,000 distinct queries (`--queries`); each has a fixed candidate list of 20 corpus passages (its retrieval result);
- a request picks its query by Zipf popularity (p(rank r) ∝ 1/r^s, s = 1.0 by default), sends the first k of its
  candidates (k uniform 10-20), and each of those is swapped for a random corpus passage with probability 0.1
  (retrieval drift: new documents, other retriever settings).
The cache key holds the query, so only (query, passage) pairs that recur can hit: the repeats come from popular
queries asked again, which is what a query-log Zipf law models.

Steps:
1. Steady-state hit rate by simulation (keys only, no engine): 40,000 requests to warm the LRU, hits counted on
   the next 10,000, for several cache sizes. Also the memory per entry.
2. Timing through an in-process Runtime (`Runtime.load`, the `mid` checkpoint, or `tiny` if mid is missing):
   a window of requests from the steady-state part of the stream, replayed with the cache off and on, alternating,
   a few clients in parallel. For "on", the cache is first filled with the keys of the 40,000 preceding requests
   (placeholder scores: this step measures time only, step 1 measures the hit rate), so the window sees the
   steady-state hit rate without scoring 40,000 requests first. Then an all-unique stream (every query new: no
   hit is possible), off vs on from an empty cache: the cache's overhead.
3. The cache's own cost per passage (key digest + lookup + insert), without the engine.

Usage: python scripts/bench_cache.py [--checkpoint checkpoints/mid] [--requests 24] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from rankserve.cache import CachedScore, CacheKeys, ScoreCache
from rankserve.model.checkpoint import open_checkpoint
from rankserve.model.synthetic import write_checkpoint
from rankserve.ranker import PROMPT_TEMPLATE_VERSION, Ranker, RankRequest, Truncate
from rankserve.runtime import Runtime, long_documents
from rankserve.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SYLLABLES = ["pro", "te", "in", "ca", "lo", "rie", "gram", "day", "wo", "men", "mar", "a", "thon", "chart", "see"]


class Stream:
    def __init__(self, seed: int, zipf_s: float, queries: int, corpus: int = 20_000) -> None:
        self.rng = np.random.default_rng(seed)
        self.corpus = [self._text(int(np.clip(self.rng.lognormal(np.log(48), 0.6), 16, 256))) for _ in range(corpus)]
        self.queries = [self._text(int(self.rng.integers(5, 15))) + "?" for _ in range(queries)]
        self.candidates = self.rng.integers(0, corpus, size=(queries, 20))
        weights = 1.0 / np.arange(1, queries + 1) ** zipf_s
        self.cdf = np.cumsum(weights / weights.sum())
        self.fresh = 0

    def _text(self, words: int) -> str:
        picks = self.rng.integers(0, len(SYLLABLES), size=(words, 2))
        return " ".join(SYLLABLES[a] + SYLLABLES[b] for a, b in picks)

    def request(self, unique: bool = False) -> tuple[str, list[str]]:
        if unique:  # a query never seen before (and never again)
            self.fresh += 1
            query = f"{self.queries[int(self.rng.integers(len(self.queries)))]} #{self.fresh}"
            q = int(self.rng.integers(len(self.queries)))
        else:
            q = min(int(np.searchsorted(self.cdf, self.rng.random())), len(self.queries) - 1)
            query = self.queries[q]
        k = int(self.rng.integers(10, 21))
        ids = [int(i) for i in self.candidates[q][:k]]
        ids = [int(self.rng.integers(len(self.corpus))) if self.rng.random() < 0.1 else i for i in ids]
        return query, [self.corpus[i] for i in ids]


def simulate_hit_rate(requests: list[tuple[str, list[str]]], warm: int, size: int, keys: CacheKeys) -> float:
    cache = ScoreCache(size)
    value = CachedScore(0.0, 0, 1)
    hits = lookups = 0
    for n, (query, passages) in enumerate(requests):
        for key in keys.for_pairs("END", query, list(dict.fromkeys(passages))):
            found = cache.get(key) is not None
            if not found:
                cache.put(key, value)
            if n >= warm:
                hits += found
                lookups += 1
    return hits / lookups


def bytes_per_entry(keys: CacheKeys, n: int = 20_000) -> float:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cache = ScoreCache(n)
    for i, key in enumerate(keys.for_pairs("END", "q", [str(i) for i in range(n)])):
        cache.put(key, CachedScore(float(i) + 0.5, 100 + i, 1))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / n


async def replay(ranker: Ranker, requests: list[tuple[str, list[str]]], clients: int) -> float:
    """Seconds to rank every request, `clients` at a time (closed loop)."""
    todo = iter(requests)

    async def client() -> None:
        for query, passages in todo:
            await ranker.rank(RankRequest(query=query, passages=passages, truncate=Truncate.END))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - started


async def timing(args: argparse.Namespace, runtime: Runtime, stream: Stream, keys: CacheKeys) -> list[dict]:
    history = [stream.request() for _ in range(args.warm)]
    window = [stream.request() for _ in range(args.requests)]
    unique = [stream.request(unique=True) for _ in range(args.requests)]
    fp = runtime.checkpoint.fingerprint

    def ranker(cache: ScoreCache | None) -> Ranker:
        kw = {"cache": cache, "fingerprint": fp} if cache is not None else {}
        return Ranker(runtime.encoder, runtime.scheduler, long_documents=long_documents(runtime.settings), **kw)

    def warmed() -> ScoreCache:
        cache = ScoreCache(args.cache_size)
        for query, passages in history:
            for key in keys.for_pairs("END", query, list(dict.fromkeys(passages))):
                cache.put(key, CachedScore(0.0, 100, 1))
        cache.hits = cache.misses = cache.evictions = 0
        return cache

    rows = []
    for rnd in range(args.rounds):
        plan = [
            ("zipf", window, lambda: None),
            ("zipf", window, warmed),
            ("unique", unique, lambda: None),
            ("unique", unique, lambda: ScoreCache(args.cache_size)),
        ]
        if rnd % 2:  # alternate which of off/on runs first
            plan = [plan[1], plan[0], plan[3], plan[2]]
        for name, requests, make in plan:
            cache = make()
            seconds = await replay(ranker(cache), requests, args.clients)
            passages = sum(len(p) for _, p in requests)
            hit = cache.hits / max(1, cache.hits + cache.misses) if cache is not None else None
            rows.append(
                {"round": rnd, "stream": name, "cache": cache is not None, "s": seconds, "p": passages, "hit": hit}
            )
            state = "on " if cache is not None else "off"
            hit_text = "" if hit is None else f"  hit rate {hit:.3f}"
            print(f"  round {rnd} {name:6s} cache {state}: {passages / seconds:7.1f} passages/s{hit_text}", flush=True)
    return rows


def micro(keys: CacheKeys, stream: Stream, n: int = 50_000) -> float:
    """µs per passage for digest + miss + insert (the whole cost the cache adds to a miss)."""
    passages = [stream.corpus[i % len(stream.corpus)] + str(i) for i in range(n)]
    cache = ScoreCache(n)
    started = time.perf_counter()
    for start in range(0, n, 16):
        chunk = passages[start : start + 16]
        for key in keys.for_pairs("END", "a typical query of a dozen words or so?", chunk):
            if cache.get(key) is None:
                cache.put(key, CachedScore(1.0, 100, 1))
    return (time.perf_counter() - started) / n * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "mid")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of query popularity")
    p.add_argument("--queries", type=int, default=100_000, help="distinct queries in the pool")
    p.add_argument("--warm", type=int, default=40_000, help="requests before the measured part")
    p.add_argument("--requests", type=int, default=24, help="requests per timed window")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--cache-size", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    ckpt_dir = args.checkpoint
    if not (ckpt_dir / "config.json").exists():
        ckpt_dir = write_checkpoint(Path("/tmp/rankserve-bench-tiny"), "tiny", seed=0)
        print(f"{args.checkpoint} missing: using a generated tiny checkpoint", file=sys.stderr)
    ckpt = open_checkpoint(str(ckpt_dir))
    settings = Settings(model=str(ckpt_dir), device="cpu", dtype="float32", log_level="warning")
    keys = CacheKeys(ckpt.fingerprint, PROMPT_TEMPLATE_VERSION, settings.max_seq_length, settings.window_overlap)

    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, checkpoint {ckpt_dir.name}, zipf s={args.zipf}")
    print("1. steady-state hit rate (of distinct pairs per request; on 10,000 requests after the warm-up):")
    for s in sorted({0.8, args.zipf}):
        stream = Stream(args.seed, s, args.queries)
        simulated = [stream.request() for _ in range(args.warm + 10_000)]
        for size in (10_000, 100_000, 1_000_000):
            rate = simulate_hit_rate(simulated, args.warm, size, keys)
            print(f"   zipf s={s}, {size:>9,} entries: {rate:.3f}", flush=True)
    print(f"   memory: {bytes_per_entry(keys):.0f} bytes per entry")

    print(f"2. timing ({args.requests} requests per window, {args.clients} clients, cache {args.cache_size:,}):")

    async def run() -> list[dict]:
        runtime = await asyncio.to_thread(Runtime.load, settings, ckpt)
        runtime.scheduler.start()
        try:
            return await timing(args, runtime, Stream(args.seed + 1, args.zipf, args.queries), keys)
        finally:
            await runtime.scheduler.close()

    rows = asyncio.run(run())
    for stream_name in ("zipf", "unique"):
        rate = {
            on: statistics.median(r["p"] / r["s"] for r in rows if r["stream"] == stream_name and r["cache"] == on)
            for on in (False, True)
        }
        hits = [r["hit"] for r in rows if r["stream"] == stream_name and r["cache"]]
        print(
            f"   {stream_name}: off {rate[False]:.1f} passages/s, on {rate[True]:.1f} passages/s, "
            f"on/off {rate[True] / rate[False]:.3f}, hit rate {statistics.median(hits):.3f} (medians of {args.rounds})"
        )
    print(f"3. cache cost per passage (digest + lookup + insert): {micro(keys, stream):.2f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The score cache: LRU order and bound, key separation, hits skip the tokenizer and the engine, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import rankserve.ranker as ranker_module
from rankserve.cache import CachedScore, CacheKeys, ScoreCache
from rankserve.errors import TooManyWindows
from rankserve.model.checkpoint import Checkpoint, open_checkpoint
from rankserve.model.synthetic import write_checkpoint
from rankserve.ranker import LongDocuments, PairEncoder, Ranker, RankRequest, Truncate
from rankserve.runtime import Runtime
from rankserve.settings import Settings
from rankserve.telemetry import Metrics
from rankserve.timing import RequestTiming

BOS = 128000
QUERY = "how much protein should a female eat?"
PASSAGES = ["46 grams per day", "the summit of a mountain", "1,200 calories a day", "46 grams per day"]


class CountingScorer:
    """Logit = number of ids in the sequence (distinct per passage); counts engine calls and sequences."""

    def __init__(self, value: float | None = None) -> None:
        self.calls = 0
        self.sequences: list[list[int]] = []
        self.value = value

    def check_capacity(self) -> None:
        pass

    async def submit(
        self, sequences: Sequence[np.ndarray], timeout: float | None = None, timing: RequestTiming | None = None
    ) -> np.ndarray:
        self.calls += 1
        self.sequences.extend(s.tolist() for s in sequences)
        if self.value is not None:
            return np.full(len(sequences), self.value, dtype=np.float32)
        return np.array([len(s) / 10 for s in sequences], dtype=np.float32)


@pytest.fixture
def encoder(tiny_encoder: PairEncoder) -> PairEncoder:
    return PairEncoder(tiny_encoder.tokenizer, BOS, 64)


def make_ranker(encoder: PairEncoder, cache: ScoreCache, scorer: CountingScorer, **kw) -> Ranker:
    return Ranker(encoder, scorer, cache=cache, fingerprint=kw.pop("fingerprint", "ckpt-a"), **kw)


def rank(ranker: Ranker, passages: list[str], truncate: Truncate = Truncate.END, **kw):
    return asyncio.run(
        ranker.rank(RankRequest(query=kw.pop("query", QUERY), passages=passages, truncate=truncate, **kw))
    )


# The LRU ----------------------------------------------------------------------------------------------------------


def test_lru_eviction_order_and_bound() -> None:
    cache = ScoreCache(2)
    a, b, c = (CachedScore(float(i), 10, 1) for i in range(3))
    cache.put(b"a", a)
    cache.put(b"b", b)
    assert cache.get(b"a") == a  # a is now the most recent
    cache.put(b"c", c)  # evicts b, the least recently used
    assert cache.get(b"b") is None
    assert cache.get(b"a") == a and cache.get(b"c") == c
    assert len(cache) == 2
    cache.put(b"a", CachedScore(9.0, 1, 1))  # an update is no eviction
    assert cache.stats() == cache.stats().__class__(hits=3, misses=1, evictions=1, entries=2, max_entries=2)
    for i in range(100):
        cache.put(f"k{i}".encode(), a)
    assert len(cache) == 2 and cache.evictions == 101
    assert cache.get(b"k98") == a and cache.get(b"k99") == a and cache.get(b"a") is None
    with pytest.raises(ValueError):
        ScoreCache(0)


def test_keys_separate_every_input() -> None:
    base = CacheKeys("fp-a", "1", 8192, 0.125)
    variants = [
        base.for_pairs("END", "q", ["p"]),
        base.for_pairs("NONE", "q", ["p"]),
        base.for_pairs("WINDOW", "q", ["p"]),
        base.for_pairs("END", "q2", ["p"]),
        base.for_pairs("END", "q", ["p2"]),
        base.for_pairs("END", "qp", [""]),  # no ambiguity where query and passage meet
        base.for_pairs("END", "", ["qp"]),
        CacheKeys("fp-b", "1", 8192, 0.125).for_pairs("END", "q", ["p"]),
        CacheKeys("fp-a", "2", 8192, 0.125).for_pairs("END", "q", ["p"]),
        CacheKeys("fp-a", "1", 512, 0.125).for_pairs("END", "q", ["p"]),
        CacheKeys("fp-a", "1", 8192, 0.25).for_pairs("END", "q", ["p"]),
    ]
    assert len({v[0] for v in variants}) == len(variants)
    assert base.for_pairs("END", "q", ["p"]) == CacheKeys("fp-a", "1", 8192, 0.125).for_pairs("END", "q", ["p"])
    assert len(base.for_pairs("END", "\ud800 lone surrogate", ["x"])[0]) == 16  # JSON allows these
    with pytest.raises(ValueError):
        CacheKeys("", "1", 8192, 0.125)


# In the ranker ----------------------------------------------------------------------------------------------------


def test_hits_skip_tokenizer_and_engine(encoder, monkeypatch) -> None:
    scorer = CountingScorer()
    ranker = make_ranker(encoder, ScoreCache(100), scorer)
    first = rank(ranker, PASSAGES)
    assert scorer.calls == 1 and len(scorer.sequences) == 3  # the repeated passage is scored once

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenize")

    monkeypatch.setattr(encoder, "encode", no_tokenizing)
    again = rank(ranker, PASSAGES)
    assert scorer.calls == 1
    assert again == first  # same rankings, same usage (usage does not depend on the cache)
    assert ranker.cache is not None and ranker.cache.hits == 3 and ranker.cache.misses == 3
    monkeypatch.undo()
    # A partial hit sends only the new passage.
    mixed = rank(ranker, ["a new passage", PASSAGES[1]])
    assert scorer.calls == 2 and len(scorer.sequences) == 4
    assert scorer.sequences[-1] == encoder.encode(QUERY, ["a new passage"], Truncate.END)[0].tolist()
    assert {r.index: r.logit for r in mixed.rankings}[1] == {r.index: r.logit for r in first.rankings}[1]


def test_cache_with_dedupe_and_top_n(encoder) -> None:
    uncached = rank(Ranker(encoder, CountingScorer()), PASSAGES, top_n=2)
    scorer = CountingScorer()
    ranker = make_ranker(encoder, ScoreCache(100), scorer)
    assert rank(ranker, PASSAGES, top_n=2) == uncached
    assert rank(ranker, PASSAGES, top_n=2) == uncached  # all hits
    order = [r.index for r in rank(ranker, list(reversed(PASSAGES))).rankings]
    assert order.index(0) == order.index(3) - 1  # the two copies tie: lower index first
    assert scorer.calls == 1


def test_key_separation_in_the_ranker(encoder, monkeypatch) -> None:
    cache = ScoreCache(100)
    scorer = CountingScorer()
    rank(make_ranker(encoder, cache, scorer), PASSAGES[:1], Truncate.END)
    rank(make_ranker(encoder, cache, scorer), PASSAGES[:1], Truncate.NONE)  # truncation mode
    rank(make_ranker(encoder, cache, scorer, fingerprint="ckpt-b"), PASSAGES[:1])  # checkpoint
    rank(make_ranker(PairEncoder(encoder.tokenizer, BOS, 32), cache, scorer), PASSAGES[:1])  # max length
    monkeypatch.setattr(ranker_module, "PROMPT_TEMPLATE_VERSION", "2")
    rank(make_ranker(encoder, cache, scorer), PASSAGES[:1])  # template version
    assert scorer.calls == 5 and cache.hits == 0 and len(cache) == 5
    with pytest.raises(ValueError, match="fingerprint"):
        Ranker(encoder, scorer, cache=cache)


def test_window_setting_shares_entries_with_window_requests(encoder) -> None:
    # With long_documents=window an END request *is* a WINDOW request: same key, same score.
    cache = ScoreCache(100)
    scorer = CountingScorer()
    window = LongDocuments(mode="window")
    rank(make_ranker(encoder, cache, scorer, long_documents=window), PASSAGES[:1], Truncate.END)
    rank(make_ranker(encoder, cache, scorer), PASSAGES[:1], Truncate.WINDOW)
    assert scorer.calls == 1 and cache.hits == 1


def test_window_cap_counts_cached_windows(encoder) -> None:
    long_passage = "protein " * 200
    scorer = CountingScorer()
    cache = ScoreCache(100)
    n = len(encoder.encode_windows(QUERY, [long_passage], 0.125, 10_000)[0])
    rank(make_ranker(encoder, cache, scorer), [long_passage], Truncate.WINDOW)
    tight = make_ranker(encoder, cache, scorer, long_documents=LongDocuments(max_windows=n))
    rank(tight, [long_passage], Truncate.WINDOW)  # a hit, within the cap
    with pytest.raises(TooManyWindows):  # the answer does not depend on what happens to be cached
        rank(tight, [long_passage, "short"], Truncate.WINDOW)
    assert scorer.calls == 1


def test_non_finite_scores_are_not_cached(encoder) -> None:
    cache = ScoreCache(100)
    rank(make_ranker(encoder, cache, CountingScorer(value=float("nan"))), PASSAGES[:1])
    assert len(cache) == 0


def test_metrics_export_the_cache() -> None:
    metrics = Metrics()
    cache = ScoreCache(1)
    metrics.observe_cache(cache)
    cache.get(b"x")
    cache.put(b"x", CachedScore(1.0, 3, 1))
    cache.get(b"x")
    cache.put(b"y", CachedScore(1.0, 3, 1))
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert samples["rankserve_cache_hits_total"] == 1
    assert samples["rankserve_cache_misses_total"] == 1
    assert samples["rankserve_cache_evictions_total"] == 1
    assert samples["rankserve_cache_entries"] == 1
    assert samples["rankserve_cache_max_entries"] == 1


# Two checkpoints --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return open_checkpoint(str(write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-seed1", "tiny", seed=1)))


def test_no_cross_talk_between_checkpoints(tiny_checkpoint: Checkpoint, other_checkpoint: Checkpoint) -> None:
    assert tiny_checkpoint.fingerprint != other_checkpoint.fingerprint
    batches: list[int] = []

    async def scores(ckpt: Checkpoint) -> list[float]:
        settings = Settings(model=str(ckpt.path), device="cpu", dtype="float32", warmup=False, score_cache_size=16)
        runtime = Runtime.load(settings, ckpt, on_batch=lambda stats: batches.append(stats.size))
        runtime.scheduler.start()
        try:
            out = []
            for _ in range(2):  # the second time from this runtime's cache
                result = await runtime.ranker.rank(RankRequest(query=QUERY, passages=PASSAGES[:1]))
                out.append(result.rankings[0].logit)
            assert runtime.ranker.cache is not None and runtime.ranker.cache.hits == 1
            return out
        finally:
            await runtime.scheduler.close()

    a = asyncio.run(scores(tiny_checkpoint))
    b = asyncio.run(scores(other_checkpoint))
    assert a[0] == a[1] and b[0] == b[1] and a[0] != b[0]
    assert batches == [1, 1]  # one engine batch per runtime: each second request was a hit


def test_cache_is_off_by_default(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    settings = Settings(model=str(tiny_checkpoint.path), device="cpu", dtype="float32", warmup=False)
    runtime = Runtime.load(settings, tiny_checkpoint)
    assert runtime.ranker.cache is None

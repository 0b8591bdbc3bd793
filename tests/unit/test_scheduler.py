"""The batching policy and failure isolation of the scheduler, with a fake engine (no model, no HTTP)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from rankserve.engines.base import EngineInfo, EngineOutOfMemory
from rankserve.errors import DeadlineExceeded, EngineFailure, Overloaded
from rankserve.scheduler import BatchPolicy, BatchStats, Scheduler

PAD = 0


class FakeEngine:
    """Logit = sum of ids (so results are checkable); records every batch; can be slowed down or broken."""

    def __init__(self, max_length: int = 512, delay: float = 0.0) -> None:
        self.info = EngineInfo("fake", "cpu", "float32", max_length, PAD, preferred_batch_tokens=4096)
        self.delay = delay
        self.batches: list[tuple[int, int]] = []  # (rows, padded length)
        self.rows_scored = 0
        self.fail_when = lambda ids, lengths: False
        self.max_rows: int | None = None  # more rows than this: out of memory
        self.nan_when = lambda ids, lengths: False
        self.gate: threading.Event | None = None

    def score(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            self.gate.wait(10)
        if self.max_rows is not None and ids.shape[0] > self.max_rows:
            raise EngineOutOfMemory(f"{ids.shape[0]} rows")
        if self.delay:
            time.sleep(self.delay)
        self.batches.append(ids.shape)
        self.rows_scored += ids.shape[0]
        assert all((ids[i, lengths[i] :] == PAD).all() for i in range(len(lengths))), "right padding expected"
        if self.fail_when(ids, lengths):
            raise RuntimeError("injected failure")
        out = ids.sum(axis=1).astype(np.float32)
        if self.nan_when(ids, lengths):
            out[0] = np.nan
        return out

    def warmup(self) -> None:
        pass


def seq(length: int, value: int = 1) -> np.ndarray:
    return np.full(length, value, dtype=np.int32)


def expected(seqs: list[np.ndarray]) -> np.ndarray:
    return np.array([s.sum() for s in seqs], dtype=np.float32)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def with_scheduler(engine: FakeEngine, policy: BatchPolicy, body, stats: list[BatchStats] | None = None):
    scheduler = Scheduler(engine, policy, on_batch=stats.append if stats is not None else None)
    scheduler.start()
    try:
        return await body(scheduler)
    finally:
        await scheduler.close()


def test_results_come_back_in_request_order() -> None:
    engine = FakeEngine()
    seqs = [seq(n, v) for n, v in [(5, 1), (300, 2), (7, 3), (40, 4), (1, 5)]]

    async def body(s: Scheduler):
        return await s.submit(seqs)

    np.testing.assert_array_equal(run(with_scheduler(engine, BatchPolicy(), body)), expected(seqs))


def test_batches_respect_token_budget_size_and_fill() -> None:
    engine = FakeEngine(max_length=256)
    policy = BatchPolicy(max_batch_size=8, max_batch_tokens=1024, min_fill=0.8)
    rng = np.random.default_rng(0)
    requests = [[seq(int(n)) for n in rng.integers(2, 256, size=int(k))] for k in rng.integers(1, 40, size=20)]
    stats: list[BatchStats] = []

    async def body(s: Scheduler):
        return await asyncio.gather(*(s.submit(r) for r in requests))

    results = run(with_scheduler(engine, policy, body, stats))
    for r, got in zip(requests, results, strict=True):
        np.testing.assert_array_equal(got, expected(r))
    for rows, length in engine.batches:
        assert rows <= 8
        assert rows * length <= 1024
    for st in stats:
        if st.size > 1:
            assert st.real_tokens >= 0.8 * st.padded_tokens
    real = sum(st.real_tokens for st in stats)
    padded = sum(st.padded_tokens for st in stats)
    assert real / padded >= 0.8
    # Cross-request batching: far fewer engine calls than sequences.
    assert len(engine.batches) < sum(len(r) for r in requests) / 2


def test_oldest_sequence_is_always_in_the_next_batch() -> None:
    """A long sequence queued first is not starved by a stream of short ones."""
    engine = FakeEngine(max_length=512)
    engine.gate = threading.Event()
    policy = BatchPolicy(max_batch_size=4, max_batch_tokens=512, pipeline_depth=1)

    async def body(s: Scheduler):
        blocker = asyncio.ensure_future(s.submit([seq(4)]))  # occupies the engine until the gate opens
        await asyncio.sleep(0.05)
        long_one = asyncio.ensure_future(s.submit([seq(500, 7)]))
        shorts = [asyncio.ensure_future(s.submit([seq(3)])) for _ in range(12)]
        await asyncio.sleep(0.05)
        engine.gate.set()
        await asyncio.gather(blocker, long_one, *shorts)
        return engine.batches

    batches = run(with_scheduler(engine, policy, body))
    assert batches[1] == (1, 500), f"the long sequence should run right after the blocker: {batches}"


def test_engine_failure_fails_only_that_batch() -> None:
    engine = FakeEngine()
    engine.fail_when = lambda ids, lengths: bool((ids == 99).any())
    policy = BatchPolicy(max_batch_size=1)  # one sequence per batch: the poisoned one is alone

    async def body(s: Scheduler):
        bad = s.submit([seq(5, 99)])
        good = s.submit([seq(5, 1), seq(6, 2)])
        results = await asyncio.gather(bad, good, return_exceptions=True)
        after = await s.submit([seq(3, 1)])
        return results, after

    (bad, good), after = run(with_scheduler(engine, policy, body))
    assert isinstance(bad, EngineFailure)
    np.testing.assert_array_equal(good, [5, 12])
    np.testing.assert_array_equal(after, [3])


def test_non_finite_logit_fails_the_request_not_a_nan_result() -> None:
    engine = FakeEngine()
    engine.nan_when = lambda ids, lengths: bool((ids == 42).any())

    async def body(s: Scheduler):
        with pytest.raises(EngineFailure):
            await s.submit([seq(5, 42)])
        return await s.submit([seq(2, 1)])

    np.testing.assert_array_equal(run(with_scheduler(engine, BatchPolicy(), body)), [2])


def test_full_queue_is_refused_with_retry_after() -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    policy = BatchPolicy(max_queue_tokens=100, pipeline_depth=1)

    async def body(s: Scheduler):
        first = asyncio.ensure_future(s.submit([seq(60)]))
        await asyncio.sleep(0.05)  # taken by the engine (blocked on the gate): no longer queued
        second = asyncio.ensure_future(s.submit([seq(60)]))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as refused:
            await s.submit([seq(60)])
        assert refused.value.retry_after_s >= 1
        engine.gate.set()
        return await asyncio.gather(first, second)

    a, b = run(with_scheduler(engine, policy, body))
    assert a[0] == 60 and b[0] == 60


def test_an_empty_queue_admits_a_request_larger_than_the_limit() -> None:
    engine = FakeEngine()

    async def body(s: Scheduler):
        return await s.submit([seq(200)] * 3)

    np.testing.assert_array_equal(run(with_scheduler(engine, BatchPolicy(max_queue_tokens=10), body)), [200] * 3)


def test_deadline_and_abandoned_work_is_not_computed() -> None:
    engine = FakeEngine(delay=0.05)
    policy = BatchPolicy(max_batch_size=1, pipeline_depth=1)

    async def body(s: Scheduler):
        with pytest.raises(DeadlineExceeded):
            await s.submit([seq(4)] * 40, timeout=0.2)
        await asyncio.sleep(0.2)
        scored_after_deadline = engine.rows_scored
        await s.submit([seq(2)])
        return scored_after_deadline

    scored = run(with_scheduler(engine, policy, body))
    assert scored < 15, f"work of an expired request kept running: {scored} rows scored"


def test_cancelled_request_drops_its_queued_sequences() -> None:
    engine = FakeEngine(delay=0.05)
    policy = BatchPolicy(max_batch_size=1, pipeline_depth=1)

    async def body(s: Scheduler):
        task = asyncio.ensure_future(s.submit([seq(4)] * 40))
        await asyncio.sleep(0.12)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.15)
        assert s.queued_tokens == 0 or engine.rows_scored < 10
        return engine.rows_scored

    assert run(with_scheduler(engine, policy, body)) < 10


def test_engine_time_excludes_waiting_for_the_batch_ahead() -> None:
    """With two batches in flight and one engine thread, the reported engine times never overlap."""
    engine = FakeEngine(delay=0.05)
    policy = BatchPolicy(max_batch_size=1, pipeline_depth=2)
    stats: list[BatchStats] = []

    async def body(s: Scheduler):
        start = time.perf_counter()
        await s.submit([seq(3)] * 8)
        return time.perf_counter() - start

    elapsed = run(with_scheduler(engine, policy, body, stats))
    assert len(stats) == 8
    # Non-overlapping intervals inside `elapsed`: their sum cannot exceed it (it did when the wait was counted).
    assert sum(st.compute_seconds for st in stats) <= elapsed


def test_token_budget_below_the_engine_max_length_is_kept() -> None:
    """The budget binds even when the engine accepts longer sequences; a longer sequence runs alone."""
    engine = FakeEngine(max_length=4096)
    policy = BatchPolicy(max_batch_size=64, max_batch_tokens=256)

    async def body(s: Scheduler):
        return await asyncio.gather(s.submit([seq(60)] * 10), s.submit([seq(1000)]))

    run(with_scheduler(engine, policy, body))
    assert (1, 1000) in engine.batches
    assert all(rows * length <= 256 for rows, length in engine.batches if length <= 256)


def test_abandoned_work_is_released_from_the_queue_at_once() -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    policy = BatchPolicy(max_batch_size=1, pipeline_depth=1, max_queue_tokens=100)

    async def body(s: Scheduler):
        blocker = asyncio.ensure_future(s.submit([seq(4)]))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await s.submit([seq(30)] * 3, timeout=0.05)
        # The engine is still busy, yet the expired request's 90 tokens no longer count against admission.
        assert s.queued_tokens == 0
        admitted = asyncio.ensure_future(s.submit([seq(50), seq(40)]))
        await asyncio.sleep(0.01)
        engine.gate.set()
        return await asyncio.gather(blocker, admitted)

    _, admitted = run(with_scheduler(engine, policy, body))
    np.testing.assert_array_equal(admitted, [50, 40])


def test_a_batch_whose_requests_all_finished_is_not_computed() -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    policy = BatchPolicy(max_batch_size=1, pipeline_depth=2)

    async def body(s: Scheduler):
        blocker = asyncio.ensure_future(s.submit([seq(4)]))
        doomed = asyncio.ensure_future(s.submit([seq(7, 3)]))  # formed as the second in-flight batch
        await asyncio.sleep(0.05)
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)
        engine.gate.set()
        await blocker
        await s.submit([seq(2)])
        return engine.batches

    batches = run(with_scheduler(engine, policy, body))
    assert (1, 7) not in batches


def test_repeated_engine_failures_make_the_scheduler_unhealthy_until_a_success() -> None:
    engine = FakeEngine()
    engine.fail_when = lambda ids, lengths: bool((ids == 99).any())

    async def body(s: Scheduler):
        assert s.healthy
        for _ in range(5):
            with pytest.raises(EngineFailure):
                await s.submit([seq(3, 99)])
        unhealthy = not s.healthy
        await s.submit([seq(3)])
        return unhealthy, s.healthy

    assert run(with_scheduler(engine, BatchPolicy(), body)) == (True, True)


def test_a_failing_telemetry_hook_does_not_hang_requests() -> None:
    engine = FakeEngine()

    def broken_hook(stats: BatchStats) -> None:
        raise RuntimeError("hook bug")

    async def body(_: Scheduler):
        s = Scheduler(engine, BatchPolicy(), on_batch=broken_hook)
        s.start()
        try:
            return await s.submit([seq(3), seq(4)], timeout=5)
        finally:
            await s.close()

    np.testing.assert_array_equal(run(body(None)), [3, 4])


def test_out_of_memory_splits_the_batch_and_retries_smaller() -> None:
    engine = FakeEngine()
    engine.max_rows = 3
    seqs = [seq(n, v) for v, n in enumerate([5, 9, 7, 30, 6, 8, 12, 4], start=1)]
    stats: list[BatchStats] = []

    async def body(s: Scheduler):
        return await s.submit(seqs)

    got = run(with_scheduler(engine, BatchPolicy(max_batch_size=8, max_batch_tokens=4096, min_fill=0.1), body, stats))
    np.testing.assert_array_equal(got, expected(seqs))
    assert all(rows <= 3 for rows, _ in engine.batches)
    assert all(st.ok for st in stats)


def test_out_of_memory_on_a_single_sequence_fails_only_that_request() -> None:
    engine = FakeEngine()
    engine.max_rows = 0

    async def body(s: Scheduler):
        with pytest.raises(EngineFailure):
            await s.submit([seq(5)])
        engine.max_rows = None
        return await s.submit([seq(2)])

    np.testing.assert_array_equal(run(with_scheduler(engine, BatchPolicy(), body)), [2])

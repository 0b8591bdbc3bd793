"""Cross-request batching: one queue of id sequences shared by every request, batches sized by tokens.

Policy, in order:
1. Admission: a request is queued whole, or refused with `Overloaded` when the queued tokens would exceed
   `max_queue_tokens` (an empty queue always admits, so one huge request cannot starve).
2. Batch formation: look at the oldest `lookahead` waiting sequences, sort them by length and grow a batch
   around the oldest one (it always goes next: no starvation), adding the neighbour in length order that wastes
   the least padding, while the padded batch stays within `max_batch_tokens`, `max_batch_size`, and real tokens
   stay at least `min_fill` of the padded tokens.
3. Execution: the engine runs in one worker thread, off the event loop; up to `pipeline_depth` batches are in
   flight, so the next batch is formed and padded while the current one computes.
4. Cancellation: sequences of a request that finished (deadline, client gone, failed) are dropped before they
   reach the engine. An engine failure, or a non-finite logit, fails only the requests in that batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rankserve.engines.base import Engine
from rankserve.errors import DeadlineExceeded, EngineFailure, Overloaded, ShuttingDown

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 64
    max_batch_tokens: int = 16384  # padded tokens (batch × longest sequence)
    max_queue_tokens: int = 2_000_000
    lookahead: int = 1024
    min_fill: float = 0.8
    pipeline_depth: int = 2


@dataclass(frozen=True)
class BatchStats:
    """What one engine call did, for telemetry."""

    size: int
    real_tokens: int
    padded_tokens: int
    queue_seconds: float  # oldest sequence's wait until the engine started on the batch
    compute_seconds: float
    ok: bool


@dataclass(eq=False)
class _Job:
    """One request's sequences and the logits filled in as their batches finish."""

    future: asyncio.Future[np.ndarray]
    logits: np.ndarray
    remaining: int
    tokens: int

    @property
    def live(self) -> bool:
        return not self.future.done()


@dataclass(eq=False, slots=True)
class _Item:
    job: _Job
    index: int
    seq: np.ndarray
    enqueued: float
    taken: bool = field(default=False)

    @property
    def length(self) -> int:
        return len(self.seq)


class _Clock:
    """Times a call inside the engine thread: a batch waiting for the one ahead of it is not engine time."""

    started = 0.0
    seconds = 0.0

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds = time.perf_counter() - self.started


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        policy: BatchPolicy,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        if policy.max_batch_tokens < engine.info.max_length:
            # A full-length sequence must fit in a batch on its own.
            policy = BatchPolicy(**{**policy.__dict__, "max_batch_tokens": engine.info.max_length})
        self.engine = engine
        self.policy = policy
        self._on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self._queued_tokens = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(policy.pipeline_depth)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._loop_task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._closed = False
        self._tokens_per_second = 0.0  # moving average, for Retry-After

    # -- public -------------------------------------------------------------------------------------------

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="scheduler")

    async def close(self) -> None:
        """Stop taking work, let batches in flight finish, fail whatever is still queued."""
        self._closed = True
        self._wakeup.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        while self._queue:
            item = self._queue.popleft()
            if item.job.live:
                item.job.future.set_exception(ShuttingDown("the server is shutting down"))
        self._queued_tokens = 0
        self._executor.shutdown(wait=True)

    async def submit(self, sequences: Sequence[np.ndarray], timeout: float | None = None) -> np.ndarray:
        """Float32 logits for `sequences`, in order. Raises Overloaded, DeadlineExceeded, EngineFailure."""
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        tokens = int(sum(len(s) for s in sequences))
        if self._queued_tokens and self._queued_tokens + tokens > self.policy.max_queue_tokens:
            raise Overloaded(
                f"the server is at capacity ({self._queued_tokens} tokens queued); retry later",
                retry_after_s=self._retry_after(),
            )
        too_long = [len(s) for s in sequences if len(s) > self.engine.info.max_length]
        if too_long:  # the ranker truncates or rejects first; this guards the engine
            raise ValueError(f"sequence of {too_long[0]} tokens exceeds the engine's {self.engine.info.max_length}")
        loop = asyncio.get_running_loop()
        job = _Job(
            future=loop.create_future(),
            logits=np.full(len(sequences), np.nan, dtype=np.float32),
            remaining=len(sequences),
            tokens=tokens,
        )
        if not sequences:
            return job.logits
        now = time.perf_counter()
        self._queue.extend(_Item(job, i, s, now) for i, s in enumerate(sequences))
        self._queued_tokens += tokens
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except asyncio.TimeoutError:
            self._abandon(job, DeadlineExceeded(f"the request did not finish within {timeout:g} s"))
            raise job.future.exception() from None  # type: ignore[misc]
        except asyncio.CancelledError:  # the client went away: drop its work
            self._abandon(job, DeadlineExceeded("the request was cancelled"))
            raise

    # -- internals ----------------------------------------------------------------------------------------

    def _abandon(self, job: _Job, error: Exception) -> None:
        if job.live:
            job.future.set_exception(error)
            job.future.exception()  # mark retrieved: nobody else awaits it

    def _retry_after(self) -> int:
        if self._tokens_per_second <= 0:
            return 1
        return max(1, min(60, math.ceil(self._queued_tokens / self._tokens_per_second)))

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            batch = self._next_batch()
            while not batch:
                self._wakeup.clear()
                await self._wakeup.wait()
                batch = self._next_batch()
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _next_batch(self) -> list[_Item]:
        """Pick the next batch (policy step 2) and take its items off the queue."""
        queue = self._queue
        window: list[_Item] = []
        for item in queue:
            if item.taken:
                continue
            if not item.job.live:  # finished request: forget its waiting sequences
                item.taken = True
                self._queued_tokens -= item.length
                continue
            window.append(item)
            if len(window) >= self.policy.lookahead:
                break
        while queue and queue[0].taken:
            queue.popleft()
        if not window:
            return []

        anchor = window[0]
        ordered = sorted(window, key=lambda it: it.length)
        lo = hi = next(i for i, it in enumerate(ordered) if it is anchor)
        longest, real = anchor.length, anchor.length
        p = self.policy
        while hi - lo + 1 < p.max_batch_size:
            count = hi - lo + 1
            options = []
            if lo > 0:
                cand = ordered[lo - 1]
                options.append((longest - cand.length, -1, cand.length))
            if hi + 1 < len(ordered):
                cand = ordered[hi + 1]
                options.append(((cand.length - longest) * count, +1, cand.length))
            grown = False
            for _waste, side, length in sorted(options):
                new_longest = max(longest, length)
                new_real = real + length
                padded = (count + 1) * new_longest
                if padded <= p.max_batch_tokens and new_real >= p.min_fill * padded:
                    if side < 0:
                        lo -= 1
                    else:
                        hi += 1
                    longest, real, grown = new_longest, new_real, True
                    break
            if not grown:
                break
        batch = ordered[lo : hi + 1]
        for item in batch:
            item.taken = True
            self._queued_tokens -= item.length
        while queue and queue[0].taken:
            queue.popleft()
        return batch

    async def _execute(self, batch: list[_Item]) -> None:
        try:
            lengths = np.fromiter((it.length for it in batch), dtype=np.int64, count=len(batch))
            ids = np.full((len(batch), int(lengths.max())), self.engine.info.pad_token_id, dtype=np.int64)
            for row, item in enumerate(batch):
                ids[row, : item.length] = item.seq
            clock = _Clock()
            ok = False
            try:
                loop = asyncio.get_running_loop()
                logits = await loop.run_in_executor(self._executor, clock.run, self.engine.score, ids, lengths)
                logits = np.asarray(logits, dtype=np.float32).reshape(-1)
                if logits.shape[0] != len(batch):
                    raise RuntimeError(f"engine returned {logits.shape[0]} logits for a batch of {len(batch)}")
                ok = True
            except Exception as e:
                log.exception("engine failed on a batch of %d sequences (%d tokens)", len(batch), ids.size)
                self._fail(batch, EngineFailure(f"the engine failed on this request's batch: {type(e).__name__}"))
                return
            finally:
                if self._on_batch is not None and clock.started:
                    queue_seconds = clock.started - min(it.enqueued for it in batch)
                    stats = BatchStats(len(batch), int(lengths.sum()), int(ids.size), queue_seconds, clock.seconds, ok)
                    self._on_batch(stats)
            if clock.seconds > 0:
                rate = int(ids.size) / clock.seconds
                old = self._tokens_per_second
                self._tokens_per_second = rate if not old else 0.8 * old + 0.2 * rate
            self._deliver(batch, logits)
        finally:
            self._slots.release()
            self._wakeup.set()

    def _deliver(self, batch: list[_Item], logits: np.ndarray) -> None:
        bad = ~np.isfinite(logits)
        failed = {id(batch[i].job): batch[i].job for i in np.flatnonzero(bad)}
        if failed:
            log.error("engine returned %d non-finite logits; failing %d request(s)", int(bad.sum()), len(failed))
        for job in failed.values():
            self._abandon(job, EngineFailure("the engine returned a non-finite score for this request"))
        for item, logit in zip(batch, logits, strict=True):
            job = item.job
            if not job.live:
                continue
            job.logits[item.index] = logit
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(job.logits)

    def _fail(self, batch: list[_Item], error: EngineFailure) -> None:
        for item in batch:
            self._abandon(item.job, error)

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

from rankserve.engines.base import Engine, EngineOutOfMemory
from rankserve.errors import DeadlineExceeded, EngineFailure, Overloaded, ShuttingDown
from rankserve.timing import RequestTiming

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 64
    max_batch_tokens: int = 16384  # padded tokens (batch × longest sequence)
    max_queue_tokens: int = 2_000_000
    lookahead: int = 1024
    min_fill: float = 0.9
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
    remaining: int  # sequences without a logit yet
    queued_tokens: int  # tokens of its sequences still waiting (not yet in a batch)
    queued_sequences: int  # its sequences still waiting
    finished: bool = False  # a plain flag the engine thread may read
    timing: RequestTiming | None = None  # telemetry: when its batches ran

    @property
    def live(self) -> bool:
        return not self.finished


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


FAILURES_UNTIL_UNHEALTHY = 5


def _log_loop_exit(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the batching loop died; no request can be served", exc_info=task.exception())


class _Clock:
    """Runs the engine call in the engine thread and times it there (waiting for the batch ahead is not
    engine time). Skips the call if every request in the batch finished while it waited."""

    started = 0.0
    seconds = 0.0

    def run_unless_finished(self, jobs: set[_Job], fn: Callable[..., Any], *args: Any) -> Any:
        if all(job.finished for job in jobs):
            return None
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
        self.engine = engine
        self.policy = policy
        self._on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self._queued_tokens = 0
        self._queued_sequences = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(policy.pipeline_depth)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._loop_task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._closed = False
        self._tokens_per_second = 0.0  # moving average, for Retry-After
        self.consecutive_failures = 0

    # -- public -------------------------------------------------------------------------------------------

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def queued_sequences(self) -> int:
        """Sequences waiting for a batch (the queue depth)."""
        return self._queued_sequences

    @property
    def healthy(self) -> bool:
        """False once the batching loop died or the engine failed `FAILURES_UNTIL_UNHEALTHY` batches in a row."""
        running = self._loop_task is not None and not self._loop_task.done()
        return running and self.consecutive_failures < FAILURES_UNTIL_UNHEALTHY

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="scheduler")
            self._loop_task.add_done_callback(_log_loop_exit)

    def check_capacity(self) -> None:
        """Cheap early refusal (before a request is tokenized) while the queue is already full."""
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        if self._queued_tokens >= self.policy.max_queue_tokens:
            raise self._overloaded()

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
            self._abandon(self._queue.popleft().job, ShuttingDown("the server is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(
        self, sequences: Sequence[np.ndarray], timeout: float | None = None, timing: RequestTiming | None = None
    ) -> np.ndarray:
        """Float32 logits for `sequences`, in order. Raises Overloaded, DeadlineExceeded, EngineFailure.

        `timing` (optional) records when the request's sequences were queued and when their batches ran.
        """
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        tokens = int(sum(len(s) for s in sequences))
        if self._queued_tokens and self._queued_tokens + tokens > self.policy.max_queue_tokens:
            raise self._overloaded()
        too_long = [len(s) for s in sequences if len(s) > self.engine.info.max_length]
        if too_long:  # the ranker truncates or rejects first; this guards the engine
            raise ValueError(f"sequence of {too_long[0]} tokens exceeds the engine's {self.engine.info.max_length}")
        loop = asyncio.get_running_loop()
        job = _Job(
            future=loop.create_future(),
            logits=np.full(len(sequences), np.nan, dtype=np.float32),
            remaining=len(sequences),
            queued_tokens=tokens,
            queued_sequences=len(sequences),
            timing=timing,
        )
        if not sequences:
            return job.logits
        now = time.perf_counter()
        if timing is not None:
            timing.queued(now)
        self._queue.extend(_Item(job, i, s, now) for i, s in enumerate(sequences))
        self._queued_tokens += tokens
        self._queued_sequences += len(sequences)
        self._wakeup.set()
        try:
            # On timeout or cancellation wait_for cancels job.future; _abandon then releases its queued work.
            return await asyncio.wait_for(job.future, timeout)
        except asyncio.TimeoutError:
            self._abandon(job, None)
            raise DeadlineExceeded("the request did not finish within its deadline") from None
        except asyncio.CancelledError:  # the client went away: drop its work
            self._abandon(job, None)
            raise

    # -- internals ----------------------------------------------------------------------------------------

    def _abandon(self, job: _Job, error: Exception | None) -> None:
        """Finish `job` with `error` (unless already done); its sequences still waiting are dropped."""
        if job.finished:
            return
        job.finished = True
        self._queued_tokens -= job.queued_tokens
        self._queued_sequences -= job.queued_sequences
        job.queued_tokens = 0
        job.queued_sequences = 0
        if error is not None and not job.future.done():
            job.future.set_exception(error)
            job.future.exception()  # mark retrieved: its waiter may be gone

    def _overloaded(self) -> Overloaded:
        if self._tokens_per_second <= 0:
            retry = 1
        else:
            retry = max(1, min(60, math.ceil(self._queued_tokens / self._tokens_per_second)))
        message = f"the server is at capacity ({self._queued_tokens} tokens queued); retry later"
        return Overloaded(message, retry_after_s=retry)

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
            if not item.job.live:  # finished request (its tokens were released then): skip
                item.taken = True
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
            item.job.queued_tokens -= item.length
            item.job.queued_sequences -= 1
            self._queued_tokens -= item.length
        self._queued_sequences -= len(batch)
        while queue and queue[0].taken:
            queue.popleft()
        return batch

    async def _execute(self, batch: list[_Item]) -> None:
        try:
            await self._compute(batch)
        except Exception as e:  # a bug of ours, not the engine's: still fail only this batch, never hang it
            log.exception("batch handling failed")
            self._fail(batch, EngineFailure(f"internal error while scoring: {type(e).__name__}"))
        finally:
            self._slots.release()
            self._wakeup.set()

    async def _compute(self, batch: list[_Item]) -> None:
        lengths = np.fromiter((it.length for it in batch), dtype=np.int64, count=len(batch))
        ids = np.full((len(batch), int(lengths.max())), self.engine.info.pad_token_id, dtype=np.int64)
        for row, item in enumerate(batch):
            ids[row, : item.length] = item.seq
        clock = _Clock()
        jobs = {item.job for item in batch}
        try:
            loop = asyncio.get_running_loop()
            logits = await loop.run_in_executor(
                self._executor, clock.run_unless_finished, jobs, self._score_splitting, ids, lengths
            )
            if logits is None:  # every request in the batch finished while it waited: nothing computed
                return
            logits = np.asarray(logits, dtype=np.float32).reshape(-1)
            if logits.shape[0] != len(batch):
                raise RuntimeError(f"engine returned {logits.shape[0]} logits for a batch of {len(batch)}")
        except Exception as e:
            log.exception("engine failed on a batch of %d sequences (%d tokens)", len(batch), ids.size)
            self.consecutive_failures += 1
            self._observe(batch, clock, lengths, ids, ok=False)
            self._fail(batch, EngineFailure(f"the engine failed on this request's batch: {type(e).__name__}"))
            return
        self.consecutive_failures = 0
        self._observe(batch, clock, lengths, ids, ok=True)
        if clock.seconds > 0:
            rate = int(ids.size) / clock.seconds
            old = self._tokens_per_second
            self._tokens_per_second = rate if not old else 0.8 * old + 0.2 * rate
        self._deliver(batch, logits)

    def _score_splitting(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """`engine.score`, halving the batch (each half trimmed to its own longest) while it runs out of memory.

        Runs in the engine thread. A single sequence that does not fit fails its batch as any engine error does.
        """
        try:
            return self.engine.score(ids, lengths)
        except EngineOutOfMemory:
            if len(lengths) == 1:
                raise
            half = len(lengths) // 2
            log.warning("out of memory on a batch of %d × %d; retrying as two halves", *ids.shape)
            first = self._score_splitting(ids[:half, : int(lengths[:half].max())], lengths[:half])
            second = self._score_splitting(ids[half:, : int(lengths[half:].max())], lengths[half:])
            return np.concatenate([np.asarray(first, dtype=np.float32), np.asarray(second, dtype=np.float32)])

    def _observe(self, batch: list[_Item], clock: _Clock, lengths: np.ndarray, ids: np.ndarray, ok: bool) -> None:
        if not clock.started:
            return
        for job in {item.job for item in batch}:
            if job.timing is not None:
                job.timing.batch(clock.started, clock.seconds)
        if self._on_batch is None:
            return
        queue_seconds = clock.started - min(it.enqueued for it in batch)
        try:
            self._on_batch(BatchStats(len(batch), int(lengths.sum()), int(ids.size), queue_seconds, clock.seconds, ok))
        except Exception:
            log.exception("batch telemetry hook failed")

    def _deliver(self, batch: list[_Item], logits: np.ndarray) -> None:
        bad = ~np.isfinite(logits)
        failed = {batch[i].job for i in np.flatnonzero(bad)}
        if failed:
            log.error("engine returned %d non-finite logits; failing %d request(s)", int(bad.sum()), len(failed))
        for job in failed:
            self._abandon(job, EngineFailure("the engine returned a non-finite score for this request"))
        for item, logit in zip(batch, logits, strict=True):
            job = item.job
            if not job.live:
                continue
            job.logits[item.index] = logit
            job.remaining -= 1
            if job.remaining == 0:
                job.finished = True
                if not job.future.done():
                    job.future.set_result(job.logits)

    def _fail(self, batch: list[_Item], error: EngineFailure) -> None:
        for item in batch:
            self._abandon(item.job, error)

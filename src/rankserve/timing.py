"""Where one request's time went: filled in by the ranker (tokenization) and the scheduler (queue, engine), read
at the HTTP edge for the access log, the metrics and the trace spans. Times are `time.perf_counter()` values."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RequestTiming:
    # perf_counter ↔ wall clock anchor, so the edge can turn these times into timestamps (trace spans).
    perf_anchor: float = field(default_factory=time.perf_counter)
    wall_anchor_ns: int = field(default_factory=time.time_ns)
    tokenize: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each tokenizer call
    enqueued: float | None = None  # sequences handed to the scheduler
    first_batch: float | None = None  # the engine started on the first batch holding one of them
    last_batch_end: float | None = None
    compute_seconds: float = 0.0  # engine time of the batches holding its sequences (shared with other requests)
    batches: int = 0

    def tokenized(self, start: float, end: float) -> None:
        self.tokenize.append((start, end))

    def queued(self, at: float) -> None:
        if self.enqueued is None:
            self.enqueued = at

    def batch(self, started: float, seconds: float) -> None:
        if self.first_batch is None or started < self.first_batch:
            self.first_batch = started
        end = started + seconds
        if self.last_batch_end is None or end > self.last_batch_end:
            self.last_batch_end = end
        self.compute_seconds += seconds
        self.batches += 1

    @property
    def tokenize_seconds(self) -> float:
        return sum(end - start for start, end in self.tokenize)

    @property
    def queue_seconds(self) -> float:
        """From handing the sequences over to the engine starting on the first of them (0 if never queued)."""
        if self.enqueued is None:
            return 0.0
        return max(0.0, (self.first_batch if self.first_batch is not None else time.perf_counter()) - self.enqueued)

    def wall_ns(self, perf: float) -> int:
        """A perf_counter value as nanoseconds since the epoch."""
        return self.wall_anchor_ns + int((perf - self.perf_anchor) * 1e9)

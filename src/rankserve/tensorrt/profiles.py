"""Optimization profiles: (batch, sequence) boxes an engine accepts, planned to fit the scheduler's batches.

The scheduler forms batches of at most `max_batch_size` rows whose padded size (rows × longest) stays within
`max_batch_tokens` (a single sequence always forms a batch, however long). Profile i covers the sequence lengths
`(bucket[i-1], bucket[i]]` with up to `min(max_batch_size, max_batch_tokens // (bucket[i-1] + 1))` rows: a batch of
B rows whose longest sequence S falls in that range has B ≤ max_batch_tokens / S ≤ max_batch_tokens / (bucket[i-1]
+ 1), so every batch the scheduler can form fits exactly one profile, and the engine never pads beyond the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: the same (batch, sequence) box for `input_ids` and `attention_mask`."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    def __post_init__(self) -> None:
        for axis in (0, 1):
            if not 1 <= self.min[axis] <= self.opt[axis] <= self.max[axis]:
                raise ValueError(f"profile needs 1 <= min <= opt <= max on each axis, got {self}")

    def covers(self, batch: int, seq: int) -> bool:
        return self.min[0] <= batch <= self.max[0] and self.min[1] <= seq <= self.max[1]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: dict[str, Sequence[int]]) -> Profile:
        def pair(key: str) -> tuple[int, int]:
            b, s = data[key]
            return int(b), int(s)

        return cls(pair("min"), pair("opt"), pair("max"))


def plan_profiles(
    *, max_batch_size: int, max_batch_tokens: int, max_seq_length: int, buckets: Iterable[int] = DEFAULT_BUCKETS
) -> list[Profile]:
    """One profile per sequence bucket up to `max_seq_length` (see the module docstring for why this fits)."""
    if max_batch_size < 1 or max_batch_tokens < 1 or max_seq_length < 1:
        raise ValueError("max_batch_size, max_batch_tokens and max_seq_length must be positive")
    tops = sorted({b for b in buckets if 0 < b < max_seq_length} | {max_seq_length})
    profiles = []
    previous = 0
    for top in tops:
        rows = min(max_batch_size, max(1, max_batch_tokens // (previous + 1)))
        # Tune for a full token budget at the bucket's longest sequences: what the scheduler forms under load.
        opt_rows = min(rows, max(1, max_batch_tokens // top))
        profiles.append(Profile(min=(1, previous + 1), opt=(opt_rows, top), max=(rows, top)))
        previous = top
    return profiles


def select_profile(profiles: Sequence[Profile], batch: int, seq: int) -> int | None:
    """The smallest profile covering (batch, seq): shortest sequence range, then fewest rows; None if none does."""
    covering = [i for i, p in enumerate(profiles) if p.covers(batch, seq)]
    if not covering:
        return None
    return min(covering, key=lambda i: (profiles[i].max[1], profiles[i].max[0], i))


def rows_at(profiles: Sequence[Profile], seq: int) -> int:
    """The most rows any profile accepts at sequence length `seq` (0: no profile accepts that length)."""
    return max((p.max[0] for p in profiles if p.min[0] == 1 and p.min[1] <= seq <= p.max[1]), default=0)


@dataclass(frozen=True)
class ShapeLimits:
    """What the scheduler must respect so that every batch it forms fits a profile."""

    max_length: int  # every length 1..max_length runs as a batch of one
    max_batch_size: int
    max_batch_tokens: int  # every batch within max_batch_size rows and this many padded tokens fits a profile


def shape_limits(profiles: Sequence[Profile]) -> ShapeLimits:
    """Derived from the profiles themselves (as read back from a built engine), not from what we meant to build."""
    if not profiles:
        raise ValueError("an engine needs at least one optimization profile")
    longest = max(p.max[1] for p in profiles)
    caps = [0] + [rows_at(profiles, s) for s in range(1, longest + 1)]
    max_length = 0
    while max_length < longest and caps[max_length + 1] >= 1:
        max_length += 1
    if max_length == 0:
        raise ValueError("no optimization profile accepts a single sequence of length 1")
    max_rows = max(caps[1 : max_length + 1])
    # Largest T such that for every length S: min(max_rows, T // S) <= caps[S].
    tokens = max_rows * max_length
    for s in range(1, max_length + 1):
        if caps[s] < max_rows:
            tokens = min(tokens, (caps[s] + 1) * s - 1)
    return ShapeLimits(max_length=max_length, max_batch_size=max_rows, max_batch_tokens=max(1, tokens))


def split_rows(profiles: Sequence[Profile], batch: int, seq: int) -> list[tuple[int, int, int]]:
    """Row chunks `(start, stop, profile)` that each fit a profile. One chunk when the batch fits as is; more only
    when a batch exceeds what the scheduler was told (a safety net, never the normal path)."""
    index = select_profile(profiles, batch, seq)
    if index is not None:
        return [(0, batch, index)]
    rows = rows_at(profiles, seq)
    if rows == 0:
        raise ValueError(f"no optimization profile accepts sequences of {seq} tokens")
    chunks = []
    for start in range(0, batch, rows):
        stop = min(batch, start + rows)
        chosen = select_profile(profiles, stop - start, seq)
        assert chosen is not None  # rows_at(seq) rows fit by construction
        chunks.append((start, stop, chosen))
    return chunks

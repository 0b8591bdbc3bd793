"""A bounded LRU of scores: (checkpoint, template, truncation, length limit, query, passage) → logit.

The ranker consults it before tokenizing, so a pair seen before (in the same truncation mode) skips the tokenizer
and the engine, whatever dialect the request came in. Keys are 128-bit BLAKE2b digests of every input that
changes a score, so an entry costs the same ~250 bytes whatever the text length, and the bound on entries is a
bound on memory.

Concurrency: the cache is used on the event loop only (the ranker reads it before, and writes it after, its
awaits; tokenizing in a worker thread never touches it), so it needs no lock. Two concurrent requests for the same
new pair both miss and both compute it; the second write wins with the same score.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


class CachedScore(NamedTuple):
    logit: float  # the max over windows when the passage was windowed
    tokens: int  # tokens of every sequence scored for the pair (what `usage` counts)
    windows: int  # sequences scored for the pair (1 unless windowed)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    max_entries: int


def _field(h: hashlib.blake2b, value: str) -> None:
    # Length-prefixed, so ("ab", "c") and ("a", "bc") never share a digest. `surrogatepass`: JSON allows lone
    # surrogates in strings, and a key must never fail where tokenizing would not.
    data = value.encode("utf-8", "surrogatepass")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


class CacheKeys:
    """Digests for one scoring context: a checkpoint, a template version, a length limit and window overlap."""

    def __init__(self, fingerprint: str, template_version: str, max_length: int, window_overlap: float) -> None:
        if not fingerprint:
            raise ValueError("cache keys need the checkpoint fingerprint")
        self._base = hashlib.blake2b(digest_size=16)
        for part in ("rankserve-score", fingerprint, template_version, str(max_length), repr(window_overlap)):
            _field(self._base, part)

    def for_pairs(self, truncate: str, query: str, passages: Sequence[str]) -> list[bytes]:
        h = self._base.copy()
        _field(h, truncate)
        _field(h, query)
        keys = []
        for passage in passages:
            k = h.copy()
            _field(k, passage)
            keys.append(k.digest())
        return keys


class ScoreCache:
    """LRU bounded by `max_entries` (≥ 1). Not thread-safe: event loop only (see the module docstring)."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1 (a size of 0 means: no cache object at all)")
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, CachedScore] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> CachedScore | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: bytes, value: CachedScore) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1

    def stats(self) -> CacheStats:
        return CacheStats(self.hits, self.misses, self.evictions, len(self._entries), self.max_entries)

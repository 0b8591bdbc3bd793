"""Text in, ranking out: the one place where query and passages become token ids.

Owns the prompt template, BOS, truncation and the over-length error, then hands the id sequences to the
scheduler and turns the logits it returns into a sorted ranking.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
from tokenizers import Tokenizer

from rankserve import windows
from rankserve.cache import CachedScore, CacheKeys, ScoreCache
from rankserve.errors import DeadlineExceeded, InputTooLong, TooManyWindows
from rankserve.timing import RequestTiming

# Bumped whenever the text given to the model changes (caches and exports record it).
PROMPT_TEMPLATE_VERSION = "1"

T = TypeVar("T")


def format_pair(query: str, passage: str) -> str:
    """The model's input text. The separator is space, newline, space, newline, space (real newlines)."""
    return f"question:{query} \n \n passage:{passage}"


class Truncate(str, enum.Enum):
    NONE = "NONE"  # reject a pair longer than the limit
    END = "END"  # cut from the right: the passage's tail first, the query's only if it alone is too long
    # Extension (the real NIM never sends it): a passage too long for one sequence is split into overlapping
    # windows, each scored as its own (query, window) pair with the normal template; the max logit is kept.
    WINDOW = "WINDOW"


class PairEncoder:
    """Tokenizes (query, passage) pairs as one sequence each: exactly one BOS first, no EOS.

    The tokenizer's own post-processor is bypassed (`add_special_tokens=False`), so the result does not
    depend on whether a tokenizer.json adds BOS, BOS+EOS, or nothing.
    """

    def __init__(self, tokenizer: Tokenizer, bos_token_id: int, max_length: int) -> None:
        if max_length < 2:
            raise ValueError("max_length must leave room for BOS and at least one token")
        self.tokenizer = tokenizer
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.bos_token_id = bos_token_id
        self.max_length = max_length

    @classmethod
    def from_file(cls, path: str | Path, bos_token_id: int, max_length: int) -> PairEncoder:
        return cls(Tokenizer.from_file(str(path)), bos_token_id, max_length)

    def encode(self, query: str, passages: Sequence[str], truncate: Truncate) -> list[np.ndarray]:
        """One int32 id array per passage, BOS first, at most `max_length` long (`NONE` and `END` only).

        With `Truncate.NONE` the first pair over the limit raises `InputTooLong` (the whole request fails).
        """
        if truncate is Truncate.WINDOW:
            raise ValueError("Truncate.WINDOW gives several sequences per passage: use encode_windows")
        budget = self.max_length - 1  # room left after BOS
        out = []
        for ids in self._pair_ids(query, passages):
            if len(ids) > budget:
                if truncate is Truncate.NONE:
                    raise InputTooLong(len(ids) + 1, self.max_length)
                ids = ids[:budget]
            out.append(self._sequence(ids))
        return out

    def encode_windows(
        self, query: str, passages: Sequence[str], overlap: float, max_windows: int
    ) -> list[list[np.ndarray]]:
        """The sequences of each passage under `Truncate.WINDOW`.

        A pair that fits is one sequence, identical to `NONE`/`END`. A longer passage becomes overlapping windows
        (`windows.split`). If the query leaves no room for even one passage token, the pair is cut as with `END`
        (windows cannot help). Raises `TooManyWindows` as soon as the total would pass `max_windows`.
        """
        budget = self.max_length - 1
        pairs = self._pair_ids(query, passages)
        out: list[list[np.ndarray]] = [[self._sequence(ids[:budget])] for ids in pairs]
        long = [i for i, ids in enumerate(pairs) if len(ids) > budget]
        room = self.window_room(query)
        if room < 1:
            long = []  # the query alone is too long: END's cut, one sequence per passage
        encodings = self.tokenizer.encode_batch([passages[i] for i in long], add_special_tokens=False)
        counts = {
            i: windows.estimate_windows(len(enc.ids), room, overlap) for i, enc in zip(long, encodings, strict=True)
        }
        total = len(passages) + sum(counts.values()) - len(counts)
        if total > max_windows:  # cheap check first, before re-tokenizing every window
            raise TooManyWindows(max_windows)
        for i, enc in zip(long, encodings, strict=True):
            found = self.passage_windows(query, passages[i], enc.offsets, room, overlap)
            total += len(found) - counts[i]
            if total > max_windows:
                raise TooManyWindows(max_windows)
            out[i] = [self._sequence(w.ids[1:]) for w in found]
        return out

    def cut_passages(self, passages: Sequence[str], max_tokens: int) -> list[str]:
        """Each passage cut to the text of its first `max_tokens` tokens (tokenized on its own)."""
        encodings = self.tokenizer.encode_batch(list(passages), add_special_tokens=False)
        return [
            p if len(e.ids) <= max_tokens else p[: e.offsets[max_tokens - 1][1]]
            for p, e in zip(passages, encodings, strict=True)
        ]

    def window_room(self, query: str) -> int:
        """Passage tokens a window aims at: what BOS, the template and the query leave of `max_length`."""
        return self.max_length - 1 - len(self._pair_ids(query, [""])[0])

    def passage_windows(
        self, query: str, passage: str, offsets: Sequence[tuple[int, int]], room: int, overlap: float
    ) -> list[windows.Window]:
        """The windows of one passage (`offsets`: its tokens' character offsets). Window ids include BOS."""

        def encode(text: str) -> list[int]:
            return [self.bos_token_id, *self._pair_ids(query, [text])[0]]

        return windows.split(passage, offsets, room, overlap, encode, self.max_length)

    def _pair_ids(self, query: str, passages: Sequence[str]) -> list[list[int]]:
        """Untruncated ids of each pair's template text, without BOS."""
        encodings = self.tokenizer.encode_batch([format_pair(query, p) for p in passages], add_special_tokens=False)
        return [enc.ids for enc in encodings]

    def _sequence(self, ids: Sequence[int]) -> np.ndarray:
        seq = np.empty(len(ids) + 1, dtype=np.int32)
        seq[0] = self.bos_token_id
        seq[1:] = ids
        return seq


class Scorer(Protocol):
    """What the ranker needs from the layer below: logits for id sequences (the scheduler)."""

    def check_capacity(self) -> None:
        """Raise (e.g. Overloaded) if new work cannot be taken now: called before tokenizing."""
        ...

    async def submit(
        self, sequences: Sequence[np.ndarray], timeout: float | None = None, timing: RequestTiming | None = None
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class RankRequest:
    query: str
    passages: Sequence[str]
    truncate: Truncate = Truncate.NONE
    top_n: int | None = None
    timeout: float | None = None
    # Each passage cut to its first N tokens (tokenized alone) before the template (Cohere v2 `max_tokens_per_doc`).
    max_passage_tokens: int | None = None


@dataclass(frozen=True)
class Ranking:
    index: int
    logit: float

    @property
    def probability(self) -> float:
        return _sigmoid(self.logit)


@dataclass(frozen=True)
class RankResult:
    rankings: list[Ranking]  # sorted by logit descending; ties: lower index first
    prompt_tokens: int  # tokens actually scored (after truncation, BOS and template included)


def sort_rankings(logits: np.ndarray, top_n: int | None = None) -> list[Ranking]:
    order = sorted(range(len(logits)), key=lambda i: (-float(logits[i]), i))
    if top_n is not None:
        order = order[:top_n]
    return [Ranking(index=i, logit=float(logits[i])) for i in order]


@dataclass(frozen=True)
class LongDocuments:
    """How the ranker treats pairs longer than one sequence (settings `long_documents`, `window_overlap`,
    `max_windows_per_request`)."""

    mode: Literal["truncate", "window"] = "truncate"  # "window": requests asking for END get WINDOW
    overlap: float = 0.125  # share of a window's passage tokens repeated in the next window
    max_windows: int = 1024  # sequences per request in WINDOW mode (a passage that fits counts as one)

    def effective(self, truncate: Truncate) -> Truncate:
        return Truncate.WINDOW if truncate is Truncate.END and self.mode == "window" else truncate


class Ranker:
    def __init__(
        self,
        encoder: PairEncoder,
        scorer: Scorer,
        *,
        long_documents: LongDocuments | None = None,
        cache: ScoreCache | None = None,
        fingerprint: str = "",
    ) -> None:
        """`cache` (optional) must belong to this ranker's checkpoint, whose `fingerprint` is part of every key."""
        self.encoder = encoder
        self.scorer = scorer
        self.long_documents = long_documents or LongDocuments()
        self.cache = cache
        self._keys = None
        if cache is not None:
            overlap = self.long_documents.overlap
            self._keys = CacheKeys(fingerprint, PROMPT_TEMPLATE_VERSION, encoder.max_length, overlap)

    async def rank(self, request: RankRequest, timing: RequestTiming | None = None) -> RankResult:
        """`timing` (optional, for telemetry) records tokenization, queue and engine times as they happen."""
        deadline = None if request.timeout is None else time.monotonic() + request.timeout
        truncate = self.long_documents.effective(request.truncate)
        passages = request.passages
        if request.max_passage_tokens is not None:
            passages = await _timed(timing, self.encoder.cut_passages, passages, request.max_passage_tokens)
        # A passage repeated within a request is scored once: identical passages get identical logits (so
        # their order is the index order) and the engine does no duplicate work. `usage` still counts each.
        unique = list(dict.fromkeys(passages))
        scores: dict[str, CachedScore] = {}
        keys: list[bytes] = []
        if self.cache is not None and self._keys is not None:
            keys = self._keys.for_pairs(truncate.value, request.query, unique)
            for passage, key in zip(unique, keys, strict=True):
                hit = self.cache.get(key)
                if hit is not None:
                    scores[passage] = hit
        missing = [p for p in unique if p not in scores]
        window_budget = self.long_documents.max_windows - sum(s.windows for s in scores.values())
        if truncate is Truncate.WINDOW and window_budget < 0:
            raise TooManyWindows(self.long_documents.max_windows)
        if missing:
            fresh = await self._score(request.query, missing, truncate, window_budget, deadline, timing)
            scores.update(fresh)
            if self.cache is not None:
                for passage, key in zip(unique, keys, strict=True):
                    value = fresh.get(passage)
                    if value is not None and math.isfinite(value.logit):
                        self.cache.put(key, value)
        logits = np.array([scores[p].logit for p in passages], dtype=np.float32)
        prompt_tokens = sum(scores[p].tokens for p in passages)
        return RankResult(rankings=sort_rankings(logits, request.top_n), prompt_tokens=int(prompt_tokens))

    async def _score(
        self,
        query: str,
        passages: list[str],
        truncate: Truncate,
        window_budget: int,
        deadline: float | None,
        timing: RequestTiming | None,
    ) -> dict[str, CachedScore]:
        """Tokenize and score `passages` (no repeats); a windowed passage gets the max over its windows."""
        self.scorer.check_capacity()
        # The Rust tokenizer releases the GIL: run it in a worker thread so the event loop keeps serving.
        if truncate is Truncate.WINDOW:
            overlap = self.long_documents.overlap
            groups = await _timed(timing, self.encoder.encode_windows, query, passages, overlap, window_budget)
        else:
            sequences = await _timed(timing, self.encoder.encode, query, passages, truncate)
            groups = [[s] for s in sequences]
        remaining = None
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("the request did not finish within its deadline")
        flat = [s for group in groups for s in group]
        logits = await self.scorer.submit(flat, timeout=remaining, timing=timing)
        out = {}
        at = 0
        for passage, group in zip(passages, groups, strict=True):
            best = float(np.max(logits[at : at + len(group)]))
            out[passage] = CachedScore(best, sum(len(s) for s in group), len(group))
            at += len(group)
        return out


async def _timed(timing: RequestTiming | None, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker thread (the Rust tokenizer releases the GIL), its time recorded in `timing`."""
    started = time.perf_counter()
    try:
        return await asyncio.to_thread(fn, *args)
    finally:
        if timing is not None:
            timing.tokenized(started, time.perf_counter())


def _sigmoid(x: float) -> float:
    # Written to avoid overflow in exp for large |x|.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)

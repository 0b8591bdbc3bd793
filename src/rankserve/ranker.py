"""Text in, ranking out: the one place where query and passages become token ids.

Owns the prompt template, BOS, truncation and the over-length error, then hands the id sequences to the
scheduler and turns the logits it returns into a sorted ranking.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer

from rankserve.errors import DeadlineExceeded, InputTooLong

# Bumped whenever the text given to the model changes (caches and exports record it).
PROMPT_TEMPLATE_VERSION = "1"


def format_pair(query: str, passage: str) -> str:
    """The model's input text. The separator is space, newline, space, newline, space (real newlines)."""
    return f"question:{query} \n \n passage:{passage}"


class Truncate(str, enum.Enum):
    NONE = "NONE"  # reject a pair longer than the limit
    END = "END"  # cut from the right: the passage's tail first, the query's only if it alone is too long


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
        """One int32 id array per passage, BOS first, at most `max_length` long.

        With `Truncate.NONE` the first pair over the limit raises `InputTooLong` (the whole request fails).
        """
        encodings = self.tokenizer.encode_batch([format_pair(query, p) for p in passages], add_special_tokens=False)
        budget = self.max_length - 1  # room left after BOS
        out = []
        for enc in encodings:
            ids = enc.ids
            if len(ids) > budget:
                if truncate is Truncate.NONE:
                    raise InputTooLong(len(ids) + 1, self.max_length)
                ids = ids[:budget]
            seq = np.empty(len(ids) + 1, dtype=np.int32)
            seq[0] = self.bos_token_id
            seq[1:] = ids
            out.append(seq)
        return out


class Scorer(Protocol):
    """What the ranker needs from the layer below: logits for id sequences (the scheduler)."""

    def check_capacity(self) -> None:
        """Raise (e.g. Overloaded) if new work cannot be taken now: called before tokenizing."""
        ...

    async def submit(self, sequences: Sequence[np.ndarray], timeout: float | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class RankRequest:
    query: str
    passages: Sequence[str]
    truncate: Truncate = Truncate.NONE
    top_n: int | None = None
    timeout: float | None = None


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


class Ranker:
    def __init__(self, encoder: PairEncoder, scorer: Scorer) -> None:
        self.encoder = encoder
        self.scorer = scorer

    async def rank(self, request: RankRequest) -> RankResult:
        deadline = None if request.timeout is None else time.monotonic() + request.timeout
        self.scorer.check_capacity()
        # A passage repeated within a request is scored once: identical passages get identical logits (so
        # their order is the index order) and the engine does no duplicate work. `usage` still counts each.
        unique = list(dict.fromkeys(request.passages))
        position = {text: i for i, text in enumerate(unique)}
        # The Rust tokenizer releases the GIL: run it in a worker thread so the event loop keeps serving.
        sequences = await asyncio.to_thread(self.encoder.encode, request.query, unique, request.truncate)
        remaining = None
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("the request did not finish within its deadline")
        unique_logits = await self.scorer.submit(sequences, timeout=remaining)
        order = [position[p] for p in request.passages]
        logits = unique_logits[order]
        prompt_tokens = sum(len(sequences[i]) for i in order)
        return RankResult(rankings=sort_rankings(logits, request.top_n), prompt_tokens=int(prompt_tokens))


def _sigmoid(x: float) -> float:
    # Written to avoid overflow in exp for large |x|.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)

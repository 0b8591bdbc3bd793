"""Overlapping windows over a passage too long for one sequence (`Truncate.WINDOW`).

Windows are ranges of the passage's own tokens. Each window's text is the slice of the original passage those
tokens came from (by character offsets, so no byte-level token is ever split into a replacement character), and
that text goes through the normal one-sequence template: the model sees, for every window, exactly what it would
see if a client had sent the window text as a passage. We do not splice passage ids after the template's ids:
the Llama-3 pre-tokenizer can merge across the `passage:` boundary, so the ids of a concatenation are not always
the concatenation of the ids.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    start: int  # index of the window's first token among the passage's tokens
    end: int  # one past its last token
    text: str  # the passage text those tokens came from
    ids: list[int]  # the whole sequence the model scores: BOS, template, query, window text


def overlap_tokens(room: int, overlap: float) -> int:
    """Tokens shared by neighbouring windows of `room` passage tokens (always leaves a step of one or more)."""
    return max(0, min(room - 1, int(room * overlap)))


def estimate_windows(n_tokens: int, room: int, overlap: float) -> int:
    """Windows for a passage of `n_tokens` before any shrinking (a lower bound on the real count)."""
    if n_tokens <= room:
        return 1
    step = room - overlap_tokens(room, overlap)
    return 1 + math.ceil((n_tokens - room) / step)


def split(
    passage: str,
    offsets: Sequence[tuple[int, int]],
    room: int,
    overlap: float,
    encode: Callable[[str], list[int]],
    max_length: int,
) -> list[Window]:
    """Windows over a passage whose tokens have these character `offsets`.

    `room` is the passage tokens a window aims at (what the template and query leave free); `encode(text)` gives
    the full sequence for a window text. A window whose sequence comes out longer than `max_length` (re-tokenizing
    a slice can add a token or two at its edges) is shrunk by the excess until it fits. Consecutive windows share
    `overlap_tokens(room, overlap)` tokens, or fewer when a window had to shrink below that. Every passage token
    lies in some window. Only when a single token does not fit next to the query is its sequence cut at
    `max_length` (the caller avoids this by checking `room` first).
    """
    n = len(offsets)
    shared = overlap_tokens(room, overlap)
    windows: list[Window] = []
    start = 0
    while True:
        end = min(start + room, n)
        while True:
            text = passage[offsets[start][0] : offsets[end - 1][1]]
            ids = encode(text)
            excess = len(ids) - max_length
            if excess <= 0 or end - start == 1:
                break
            end = max(start + 1, end - excess)
        windows.append(Window(start, end, text, ids[:max_length]))
        if end >= n:
            return windows
        start = max(end - shared, start + 1)

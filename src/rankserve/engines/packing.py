"""Packing: right-padded batches → tokens back to back (no padding), and the fixed shapes CUDA graphs replay.

Host-side and numpy only, so it is tested on any machine. The model side is `Reranker.forward_packed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Packed:
    """Sequences back to back. The first `n_real` sequences are the caller's; any after them are filler."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64, 0..len-1 within each sequence
    seq_ids: np.ndarray  # [T] int64, the sequence each token belongs to
    cu_seqlens: np.ndarray  # [N + 1] int64: sequence i is tokens cu[i]..cu[i+1]
    max_seqlen: int
    n_real: int

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_seqs(self) -> int:
        return int(self.cu_seqlens.shape[0] - 1)

    def host_buffer(self) -> np.ndarray:
        """ids | positions | seq_ids | cu_seqlens as one int64 array: one host-to-device copy."""
        return np.concatenate([self.input_ids, self.positions, self.seq_ids, self.cu_seqlens])


def pack(input_ids: np.ndarray, lengths: np.ndarray) -> Packed:
    """Drop the right padding of `input_ids` `[B, S]` (row i holds `lengths[i]` real tokens)."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[0] != lengths.shape[0]:
        raise ValueError(f"input_ids {ids.shape} and lengths {lengths.shape} disagree")
    if lengths.size and (lengths.min() < 1 or lengths.max() > ids.shape[1]):
        raise ValueError(f"lengths must lie in 1..{ids.shape[1]}")
    cu = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    total = int(cu[-1])
    mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    flat = ids[mask].astype(np.int64, copy=False)  # row-major: sequence 0's tokens, then sequence 1's, ...
    seq_ids = np.repeat(np.arange(lengths.shape[0], dtype=np.int64), lengths)
    positions = np.arange(total, dtype=np.int64) - cu[:-1][seq_ids]
    max_seqlen = int(lengths.max()) if lengths.size else 0
    return Packed(flat, positions, seq_ids, cu, max_seqlen, int(lengths.shape[0]))


def pad_packed(p: Packed, tokens: int, slots: int, max_seqlen: int, pad_token_id: int) -> Packed:
    """Grow `p` to exactly `tokens` tokens and `slots` sequences (a CUDA graph's fixed shapes).

    The spare tokens form filler sequences of at most `max_seqlen` tokens each; the spare slots after them are
    empty sequences (zero tokens). Real sequences keep their places and their logits; filler logits are discarded.
    """
    spare = tokens - p.tokens
    if spare < 0 or p.max_seqlen > max_seqlen:
        raise ValueError(
            f"a pack of {p.tokens} tokens (longest {p.max_seqlen}) exceeds the shape {tokens}×{max_seqlen}"
        )
    fillers = [max_seqlen] * (spare // max_seqlen) + ([spare % max_seqlen] if spare % max_seqlen else [])
    if p.n_seqs + len(fillers) > slots:
        raise ValueError(f"{p.n_seqs} sequences and {len(fillers)} fillers do not fit {slots} slots")
    lengths = np.diff(p.cu_seqlens)
    all_lengths = np.concatenate([lengths, np.asarray(fillers, dtype=np.int64), np.zeros(slots, dtype=np.int64)])
    all_lengths = all_lengths[:slots]
    cu = np.zeros(slots + 1, dtype=np.int64)
    np.cumsum(all_lengths, out=cu[1:])
    seq_ids = np.repeat(np.arange(slots, dtype=np.int64), all_lengths)
    positions = np.arange(tokens, dtype=np.int64) - cu[:-1][seq_ids]
    ids = np.concatenate([p.input_ids, np.full(spare, pad_token_id, dtype=np.int64)])
    return Packed(ids, positions, seq_ids, cu, max(p.max_seqlen, max(fillers, default=0)), p.n_real)


def token_buckets(max_tokens: int, step: int) -> list[int]:
    """Token counts a graph is captured for: step, 2·step, ... up to max_tokens (at most `step - 1` wasted)."""
    if step < 1 or max_tokens < step:
        return []
    return list(range(step, max_tokens + 1, step))


def pick_bucket(buckets: list[int], tokens: int) -> int | None:
    """The smallest bucket holding `tokens`, or None (too big: run eagerly)."""
    for b in buckets:
        if b >= tokens:
            return b
    return None


def slots_for(bucket_tokens: int, max_batch: int, max_seqlen: int) -> int:
    """Sequence slots a graph needs: the real sequences plus the fillers of any pack that fits the bucket."""
    return max_batch + -(-bucket_tokens // max_seqlen) + 1

"""CUDA graphs over packed batches: one graph per token bucket, captured at warm-up, replayed per batch.

A graph fixes every shape and every host-side number, so each bucket gets static device buffers (ids,
positions, sequence ids, cu_seqlens) of exactly `bucket` tokens and `slots` sequences, and each batch is padded
to them (`packing.pad_packed`: filler and empty sequences, whose logits are dropped). Small batches are where
graphs pay (a forward of a few hundred tokens is shorter than launching its ~300 kernels from Python), so only
buckets up to `max_tokens` get one; bigger batches run eagerly.

Without CUDA (`use_graphs=False`) the runner still pads to the same static buffers and calls the forward on
them, so the bookkeeping is tested on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from rankserve.engines.packing import Packed, pack, pad_packed, pick_bucket, slots_for, token_buckets

log = logging.getLogger(__name__)

# forward(input_ids, positions, seq_ids, cu_seqlens, max_seqlen) -> logits [slots]
PackedForward = Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor]


@dataclass
class _Bucket:
    tokens: int
    slots: int
    max_seqlen: int
    static: Tensor  # int64 [3 * tokens + slots + 1]: ids | positions | seq_ids | cu_seqlens
    host: Tensor  # the same layout on the host (pinned on CUDA)
    output: Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None
    replays: int = 0

    def views(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        t = self.tokens
        s = self.static
        return s[:t], s[t : 2 * t], s[2 * t : 3 * t], s[3 * t :]


@dataclass
class GraphRunner:
    forward: PackedForward
    device: torch.device
    max_tokens: int
    step: int
    max_batch: int
    max_length: int
    pad_token_id: int
    use_graphs: bool = True
    buckets: dict[int, _Bucket] = field(default_factory=dict)
    pool: object | None = None

    @property
    def bucket_sizes(self) -> list[int]:
        return token_buckets(self.max_tokens, self.step)

    def capture(self) -> None:
        """Build every bucket's buffers and (on CUDA) capture its graph; largest first so the memory pool that
        the graphs share is sized once."""
        for tokens in sorted(self.bucket_sizes, reverse=True):
            bucket = self._make_bucket(tokens)
            # A representative pack: one sequence as long as the bucket allows, the rest filler.
            first = min(tokens, bucket.max_seqlen)
            dummy = pack(np.full((1, first), self.pad_token_id, dtype=np.int64), np.array([first]))
            self._load(bucket, dummy)
            if self.use_graphs:
                self._capture(bucket)
            self.buckets[tokens] = bucket
        log.info("CUDA graphs: %d buckets of %d..%d tokens", len(self.buckets), self.step, self.max_tokens)

    def run(self, p: Packed) -> Tensor | None:
        """Logits `[p.n_real]` (on the device, not yet synchronised), or None when no bucket fits `p`."""
        tokens = pick_bucket(sorted(self.buckets), p.tokens)
        if tokens is None or p.n_seqs > self.max_batch:
            return None
        bucket = self.buckets[tokens]
        if p.max_seqlen > bucket.max_seqlen:
            return None
        self._load(bucket, p)
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            bucket.output = self.forward(*bucket.views(), bucket.max_seqlen)
        bucket.replays += 1
        assert bucket.output is not None
        return bucket.output[: p.n_real]

    # -- internals ----------------------------------------------------------------------------------------

    def _make_bucket(self, tokens: int) -> _Bucket:
        max_seqlen = min(tokens, self.max_length)
        slots = slots_for(tokens, self.max_batch, max_seqlen)
        size = 3 * tokens + slots + 1
        pinned = self.device.type == "cuda"
        host = torch.empty(size, dtype=torch.int64, pin_memory=pinned)
        static = torch.zeros(size, dtype=torch.int64, device=self.device)
        return _Bucket(tokens, slots, max_seqlen, static, host)

    def _load(self, bucket: _Bucket, p: Packed) -> None:
        padded = pad_packed(p, bucket.tokens, bucket.slots, bucket.max_seqlen, self.pad_token_id)
        bucket.host.numpy()[:] = padded.host_buffer()
        # The host buffer is reused: the copy must be done before the next batch overwrites it. The engine
        # synchronises on each batch's logits, which come after this copy on the same stream.
        bucket.static.copy_(bucket.host, non_blocking=True)

    def _capture(self, bucket: _Bucket) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph: cuBLAS handles, autotuning, lazy allocations
                self.forward(*bucket.views(), bucket.max_seqlen)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            bucket.output = self.forward(*bucket.views(), bucket.max_seqlen)
        if self.pool is None:
            self.pool = graph.pool()
        bucket.graph = graph

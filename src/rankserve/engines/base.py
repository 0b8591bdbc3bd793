"""The engine interface: right-padded id arrays in, float32 logits out. Nothing about requests or text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class EngineInfo:
    backend: str  # "torch", later "onnxruntime", "tensorrt"
    device: str  # "cpu", "cuda:0", ...
    precision: str  # "float32", "bfloat16", ...
    max_length: int  # longest sequence (BOS included) the engine accepts
    pad_token_id: int
    preferred_batch_tokens: int  # padded tokens per batch where throughput peaks (the scheduler's default budget)
    # Hard shape limits (TensorRT: what its optimization profiles accept); None: no limit. The scheduler keeps
    # its batches within them whatever the settings say.
    max_batch_size: int | None = None
    max_batch_tokens: int | None = None


class EngineOutOfMemory(RuntimeError):
    """The device ran out of memory on this batch; a smaller batch may fit (the scheduler splits and retries)."""


class Engine(Protocol):
    info: EngineInfo

    def score(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """`input_ids` int `[B, S]` right-padded, `lengths` int `[B]` → float32 logits `[B]`.

        Called from one worker thread at a time (the scheduler's), never from the event loop. Raises
        `EngineOutOfMemory` when the batch does not fit in device memory.
        """
        ...

    def warmup(self) -> None:
        """Run representative shapes once so the first request pays no one-off costs."""
        ...

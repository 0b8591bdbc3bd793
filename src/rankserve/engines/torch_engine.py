"""The PyTorch engine: runs `rankserve.model.llama.Reranker` eagerly on CPU or CUDA."""

from __future__ import annotations

import logging

import numpy as np
import torch

from rankserve.engines.base import EngineInfo, EngineOutOfMemory
from rankserve.model.checkpoint import Checkpoint, load_model
from rankserve.model.llama import Reranker

log = logging.getLogger(__name__)

# Measured with scripts/bench_engine.py (docs/benchmarks.md): on CPU, tokens/s peaks at 1-2 k padded tokens per
# batch and falls slowly beyond. The CUDA value is a starting point until GPU measurements set it.
CPU_BATCH_TOKENS = 2048
CUDA_BATCH_TOKENS = 16384

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} asked for, but PyTorch sees no CUDA GPU")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 is the checkpoint's precision and fast on GPUs; CPUs without AMX run fp32 faster.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class TorchEngine:
    def __init__(self, model: Reranker, device: torch.device, max_length: int, pad_token_id: int) -> None:
        self.model = model
        self.device = device
        dtype = next(model.parameters()).dtype
        self.info = EngineInfo(
            backend="torch",
            device=str(device),
            precision=str(dtype).removeprefix("torch."),
            max_length=max_length,
            pad_token_id=pad_token_id,
            preferred_batch_tokens=CPU_BATCH_TOKENS if device.type == "cpu" else CUDA_BATCH_TOKENS,
        )

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, *, device: str = "auto", dtype: str = "auto", max_length: int | None = None
    ) -> TorchEngine:
        dev = pick_device(device)
        model = load_model(ckpt, device=dev, dtype=pick_dtype(dtype, dev))
        limit = min(max_length or ckpt.config.max_length, ckpt.config.max_length)
        return cls(model, dev, limit, ckpt.config.pad_token_id)

    @torch.inference_mode()
    def score(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        try:
            ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device, non_blocking=True)
            lens = torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int64)).to(self.device, non_blocking=True)
            return self.model(ids, lens).float().cpu().numpy()
        except torch.cuda.OutOfMemoryError as e:  # raised for any CUDA device; CPU allocation failures differ
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # give back what the failed batch held before a smaller one runs
            raise EngineOutOfMemory(f"{self.device} out of memory on a batch of {input_ids.shape}") from e

    def warmup(self) -> None:
        for batch, seqlen in ((1, 8), (4, 64)):
            ids = np.full((batch, seqlen), self.info.pad_token_id, dtype=np.int64)
            self.score(ids, np.full(batch, seqlen, dtype=np.int64))

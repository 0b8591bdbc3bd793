"""Engines: one module per backend behind the `Engine` interface."""

from __future__ import annotations

from rankserve.engines.base import Engine, EngineInfo, EngineOutOfMemory
from rankserve.model.checkpoint import Checkpoint

BACKENDS = ("auto", "torch")


def create_engine(ckpt: Checkpoint, *, backend: str, device: str, dtype: str, max_length: int | None) -> Engine:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    try:
        from rankserve.engines.torch_engine import TorchEngine
    except ImportError as e:
        raise RuntimeError(f"the torch backend needs PyTorch ({e}): pip install 'rankserve[torch]'") from None

    return TorchEngine.from_checkpoint(ckpt, device=device, dtype=dtype, max_length=max_length)


__all__ = ["BACKENDS", "Engine", "EngineInfo", "EngineOutOfMemory", "create_engine"]

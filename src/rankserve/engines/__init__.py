"""Engines: one module per backend behind the `Engine` interface."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rankserve.engines.base import Engine, EngineInfo, EngineOutOfMemory
from rankserve.model.checkpoint import Checkpoint

if TYPE_CHECKING:
    from rankserve.tensorrt.auto import TensorRTOptions

BACKENDS = ("auto", "torch", "tensorrt")


def _on_gpu(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def create_engine(
    ckpt: Checkpoint,
    *,
    backend: str,
    device: str,
    dtype: str,
    max_length: int | None,
    tensorrt: TensorRTOptions | None = None,
) -> Engine:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "tensorrt" or (backend == "auto" and _on_gpu(device)):
        # A configured or cached TensorRT engine for this GPU, else one built once; `auto` falls back to PyTorch
        # CUDA (logging why), `tensorrt` fails. docs/tensorrt.md.
        from rankserve.tensorrt.auto import TensorRTOptions, open_engine

        engine = open_engine(
            ckpt,
            device=device,
            dtype=dtype,
            max_length=max_length,
            options=tensorrt or TensorRTOptions(),
            required=backend == "tensorrt",
        )
        if engine is not None:
            return engine
    try:
        from rankserve.engines.torch_engine import TorchEngine
    except ImportError as e:
        raise RuntimeError(f"the torch backend needs PyTorch ({e}): pip install 'rankserve[torch]'") from None

    return TorchEngine.from_checkpoint(ckpt, device=device, dtype=dtype, max_length=max_length)


__all__ = ["BACKENDS", "Engine", "EngineInfo", "EngineOutOfMemory", "create_engine"]

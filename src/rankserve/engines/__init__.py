"""Engines: one module per backend behind the `Engine` interface."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from rankserve.engines.base import Engine, EngineInfo, EngineOutOfMemory
from rankserve.model.checkpoint import Checkpoint

if TYPE_CHECKING:
    from rankserve.engines.onnxruntime_engine import OnnxRuntimeOptions
    from rankserve.engines.torch_options import TorchOptions
    from rankserve.tensorrt.auto import TensorRTOptions

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


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
    onnxruntime: OnnxRuntimeOptions | None = None,
    torch: TorchOptions | None = None,
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
    if backend == "onnxruntime" or (
        backend == "auto" and not _on_gpu(device) and _cpu_auto_picks_onnxruntime(ckpt, dtype, max_length)
    ):
        # `auto` on a CPU follows the measurement in onnxruntime_engine.auto_choice (today: torch; docs/onnx.md).
        onnx_engine = _onnxruntime_engine(ckpt, device, dtype, max_length, onnxruntime, required=backend != "auto")
        if onnx_engine is not None:
            return onnx_engine
    try:
        from rankserve.engines.torch_engine import TorchEngine
    except ImportError as e:
        raise RuntimeError(f"the torch backend needs PyTorch ({e}): pip install 'rankserve[torch]'") from None

    return TorchEngine.from_checkpoint(ckpt, device=device, dtype=dtype, max_length=max_length, options=torch)


def _onnxruntime_engine(
    ckpt: Checkpoint,
    device: str,
    dtype: str,
    max_length: int | None,
    options: OnnxRuntimeOptions | None,
    *,
    required: bool,
) -> Engine | None:
    """The ONNX Runtime CPU engine; for `auto`, None (and a warning) when it fails to start: torch serves instead."""
    if device not in ("auto", "cpu"):
        raise ValueError(f"the onnxruntime backend runs on the CPU (--device cpu), not {device}")
    try:
        import onnx  # noqa: F401 - the export needs it
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"the onnxruntime backend needs ({e}): pip install 'rankserve[onnx]'") from None
    from rankserve.engines.onnxruntime_engine import OnnxRuntimeEngine

    try:
        return OnnxRuntimeEngine.from_checkpoint(ckpt, dtype=dtype, max_length=max_length, options=options)
    except Exception as e:
        if required:
            raise
        logging.getLogger(__name__).warning("auto: the onnxruntime engine failed (%r); using torch on the CPU", e)
        return None


def _cpu_auto_picks_onnxruntime(ckpt: Checkpoint, dtype: str, max_length: int | None) -> bool:
    from rankserve.engines.onnxruntime_engine import auto_choice

    use, reason = auto_choice(ckpt, dtype, max_length)
    logging.getLogger(__name__).info("backend auto on the CPU: %s", reason)
    return use


__all__ = ["BACKENDS", "Engine", "EngineInfo", "EngineOutOfMemory", "create_engine"]

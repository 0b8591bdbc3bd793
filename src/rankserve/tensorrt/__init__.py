"""TensorRT: optimization profiles, engine builds from the ONNX export, engine metadata and compatibility.

Nothing here imports `tensorrt` at module level: the planning, metadata and cache logic run (and are tested)
without it. `load_tensorrt()` is the one place the library is imported.
"""

from __future__ import annotations

from types import ModuleType

MIN_TENSORRT = (10, 0)  # the name-based I/O API (set_input_shape, set_tensor_address, execute_async_v3), int64 I/O


class TensorRTUnavailable(RuntimeError):
    """`tensorrt` cannot be imported here, or is too old."""


def version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def load_tensorrt() -> ModuleType:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            f"TensorRT is not installed ({e}); use NVIDIA's TensorRT container (see the Dockerfile and "
            "docs/tensorrt.md) or pip install tensorrt on a machine with an NVIDIA GPU"
        ) from None
    if version_tuple(trt.__version__)[:2] < MIN_TENSORRT:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old: rankserve needs >= 10.0")
    return trt

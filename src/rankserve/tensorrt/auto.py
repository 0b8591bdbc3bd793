"""Start-up on a GPU, as the NIM does it: a cached engine for this GPU, else build one once (cached on a volume),
else the PyTorch CUDA engine, with a log line saying why.

`decide()` is the pure decision (tested without TensorRT); `open_engine()` carries it out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rankserve.tensorrt.metadata import (
    PLAN_FILE,
    EngineIncompatible,
    GpuInfo,
    incompatibility,
    read_metadata,
)
from rankserve.tensorrt.targets import CUDA_BATCH_TOKENS, BuildTarget

if TYPE_CHECKING:
    from rankserve.engines.base import Engine
    from rankserve.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/rankserve/engines"


@dataclass(frozen=True)
class TensorRTOptions:
    """What the settings say about TensorRT (see docs/tensorrt.md)."""

    engine_dir: str | None = None  # a built engine to serve; None: look in the cache
    cache_dir: str = DEFAULT_CACHE_DIR
    build: bool = True  # build (once) when no engine is cached
    max_batch_size: int = 64
    max_batch_tokens: int | None = None
    max_seq_length: int = 8192


@dataclass(frozen=True)
class Decision:
    action: Literal["load", "build", "torch"]
    reason: str
    path: Path | None = None  # the engine to load, or where to build one


def precision_for(dtype: str, gpu: GpuInfo) -> str:
    if dtype == "auto":  # bf16 (the checkpoint's precision) where the GPU has it: Ampere (8.0) and later
        return "bf16" if int(gpu.compute_capability.split(".")[0]) >= 8 else "fp16"
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]


def auto_target(options: TensorRTOptions, gpu: GpuInfo, precision: str, checkpoint_max_length: int) -> BuildTarget:
    """Profiles planned from the server's own batching settings, so its batches fit them."""
    return BuildTarget(
        name=f"auto-sm{gpu.compute_capability}",
        precision=precision,
        precisions=(precision,),
        max_batch_size=options.max_batch_size,
        max_batch_tokens=options.max_batch_tokens or CUDA_BATCH_TOKENS,
        max_seq_length=min(options.max_seq_length, checkpoint_max_length),
    )


def cache_key(*, fingerprint: str, precision: str, gpu: GpuInfo, tensorrt_version: str, target: BuildTarget) -> str:
    """One directory per (weights, precision, GPU architecture, TensorRT version, profiles)."""
    shapes = json.dumps([p.to_dict() for p in target.profiles()], sort_keys=True)
    profile_hash = hashlib.sha256(shapes.encode()).hexdigest()[:8]
    return f"{fingerprint}-{precision}-{arch_tag(gpu, tensorrt_version)}-{profile_hash}"


def arch_tag(gpu: GpuInfo, tensorrt_version: str) -> str:
    """`sm90-trt10.13.0`: what a plan and a timing cache hold only for (a file-name-safe version)."""
    trt = re.sub(r"[^0-9A-Za-z.]", "_", tensorrt_version)
    return f"sm{gpu.compute_capability.replace('.', '')}-trt{trt}"


def decide(
    *,
    tensorrt_version: str | None,
    tensorrt_error: str = "",
    gpu: GpuInfo,
    fingerprint: str,
    options: TensorRTOptions,
    key: str,
    can_export: bool,
) -> Decision:
    """`tensorrt_version` None: TensorRT does not import (`tensorrt_error` says why)."""
    if tensorrt_version is None:
        return Decision("torch", f"TensorRT is not available ({tensorrt_error})")
    if options.engine_dir:
        path = Path(options.engine_dir).expanduser()
        reason = _unusable(path, tensorrt_version, gpu, fingerprint)
        if reason is None:
            return Decision("load", f"the configured engine {path}", path)
        return Decision("torch", f"the configured engine {path} cannot serve here: {reason}")
    cached = Path(options.cache_dir).expanduser() / key
    if (cached / PLAN_FILE).is_file():
        reason = _unusable(cached, tensorrt_version, gpu, fingerprint)
        if reason is None:
            return Decision("load", f"the cached engine {cached}", cached)
        log.warning("ignoring the cached engine %s: %s", cached, reason)
    if not options.build:
        return Decision("torch", f"no TensorRT engine for this GPU in {options.cache_dir} and building is off")
    if not can_export:
        return Decision("torch", "no cached TensorRT engine, and the ONNX export needs `pip install 'rankserve[onnx]'`")
    return Decision("build", f"no cached TensorRT engine for {gpu.name}: building one into {cached}", cached)


def _unusable(path: Path, tensorrt_version: str, gpu: GpuInfo, fingerprint: str) -> str | None:
    try:
        meta = read_metadata(path)
    except EngineIncompatible as e:
        return str(e)
    return incompatibility(meta, tensorrt_version=tensorrt_version, gpu=gpu, fingerprint=fingerprint)


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """One builder per cache entry across processes and replicas sharing the volume (flock on a lock file)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_cached(ckpt: Checkpoint, destination: Path, target: BuildTarget, gpu: GpuInfo, tensorrt_version: str) -> Path:
    """Export the checkpoint to ONNX in the target precision and build into `destination` (atomically: a crashed
    build leaves no half-written entry). A replica that finds the entry built while it waited uses it; an unusable
    entry is replaced."""
    from rankserve.export.onnx import export_onnx
    from rankserve.tensorrt.build import DTYPE_OF_PRECISION, build_engine

    with build_lock(destination.with_name(destination.name + ".lock")):
        if destination.exists():
            if _unusable(destination, tensorrt_version, gpu, ckpt.fingerprint) is None:
                return destination
            shutil.rmtree(destination)
        work = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
        try:
            print(f"exporting {ckpt.path} to ONNX ({target.precision}) for the TensorRT build", file=sys.stderr)
            onnx_path = export_onnx(ckpt, work / "onnx", dtype=DTYPE_OF_PRECISION[target.precision])
            timing = destination.parent / f"timing-{arch_tag(gpu, tensorrt_version)}.cache"
            build_engine(
                onnx_path,
                work / "engine",
                target,
                gpu=gpu,
                precision=target.precision,
                timing_cache=timing,
                checkpoint_fingerprint=ckpt.fingerprint,
            )
            os.replace(work / "engine", destination)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return destination


def open_engine(
    ckpt: Checkpoint, *, device: str, dtype: str, max_length: int | None, options: TensorRTOptions, required: bool
) -> Engine | None:
    """The TensorRT engine per `decide()`. `required` (backend tensorrt): raise instead of returning None (the
    caller then falls back to PyTorch CUDA)."""
    from rankserve.tensorrt import TensorRTUnavailable, load_tensorrt

    try:
        gpu = current_gpu(device)
    except EngineIncompatible as e:
        if required:
            raise EngineIncompatible(f"--backend tensorrt cannot start: {e}") from None
        log.warning("not using TensorRT: %s", e)
        return None
    try:
        trt_version, trt_error = load_tensorrt().__version__, ""
    except TensorRTUnavailable as e:
        trt_version, trt_error = None, str(e)
    precision = precision_for(dtype, gpu)
    target = auto_target(options, gpu, precision, ckpt.config.max_length)
    fingerprint = ckpt.fingerprint
    decision = decide(
        tensorrt_version=trt_version,
        tensorrt_error=trt_error,
        gpu=gpu,
        fingerprint=fingerprint,
        options=options,
        key=cache_key(
            fingerprint=fingerprint, precision=precision, gpu=gpu, tensorrt_version=trt_version or "", target=target
        ),
        can_export=_can_export(),
    )
    if decision.action == "torch":
        if required:
            raise EngineIncompatible(f"--backend tensorrt cannot start: {decision.reason}")
        log.warning("using the PyTorch CUDA engine: %s", decision.reason)
        return None
    log.info("TensorRT: %s", decision.reason)
    from rankserve.engines.tensorrt_engine import TensorRTEngine

    cuda = device if device.startswith("cuda") else "cuda"
    try:
        assert decision.path is not None
        path = decision.path
        if decision.action == "build":
            path = build_cached(ckpt, decision.path, target, gpu, trt_version or "")
        return TensorRTEngine.from_directory(path, ckpt, device=cuda, max_length=max_length)
    except Exception as e:
        if required:
            raise
        log.warning("using the PyTorch CUDA engine: the TensorRT engine failed to %s (%s)", decision.action, e)
        return None


def current_gpu(device: str) -> GpuInfo:
    import torch

    if not torch.cuda.is_available():
        raise EngineIncompatible(f"TensorRT needs an NVIDIA GPU and PyTorch sees none (device {device!r})")
    index = torch.device(device).index if device.startswith("cuda") else None
    return GpuInfo.current(torch.cuda.current_device() if index is None else index)


def _can_export() -> bool:
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None for m in ("rankserve.export.onnx", "onnx"))
    except ImportError:
        return False

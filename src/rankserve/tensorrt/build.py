"""Build a TensorRT engine from the ONNX export: parse (external data included), one optimization profile per
sequence bucket, workspace limit, timing cache, progress on stderr; write `model.plan` and `engine.json`.

Networks are strongly typed (the only kind TensorRT 11 builds; opt-in on 10.x): the precision is the ONNX graph's
own — export in bf16 or fp16 for a bf16 or fp16 engine; FP8 needs an ONNX quantized by NVIDIA ModelOpt (Q/DQ nodes).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from rankserve.export.onnx import INPUT_NAMES as INPUTS
from rankserve.export.onnx import ONNX_FILE
from rankserve.export.onnx import OUTPUT_NAME as OUTPUT
from rankserve.tensorrt import load_tensorrt
from rankserve.tensorrt.metadata import PLAN_FILE, EngineMetadata, GpuInfo, write_metadata
from rankserve.tensorrt.profiles import Profile
from rankserve.tensorrt.targets import BuildTarget, capabilities

log = logging.getLogger(__name__)

# ONNX export dtype names (the export's `rankserve.dtype` metadata and Settings.dtype) → engine precision
PRECISION_OF_DTYPE = {"float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16", "bfloat16": "bf16",
                      "bf16": "bf16"}  # fmt: skip
DTYPE_OF_PRECISION = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class BuildError(RuntimeError):
    """The engine could not be built; the message says why."""


@dataclass(frozen=True)
class OnnxInfo:
    path: Path
    precision: str
    metadata: dict[str, str]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def onnx_file(path: str | Path) -> Path:
    """`DIR` (holding model.onnx) or the .onnx file itself."""
    path = Path(path)
    candidate = path / ONNX_FILE if path.is_dir() else path
    if not candidate.is_file():
        raise BuildError(f"no ONNX model at {candidate}: export one with `rankserve export onnx` or pass --model")
    return candidate


def inspect_onnx(path: Path) -> OnnxInfo:
    """Graph I/O names, `rankserve.*` metadata and precision, without loading the (external) weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    graph = model.graph
    initializer_names = {t.name for t in graph.initializer}
    inputs = tuple(i.name for i in graph.input if i.name not in initializer_names)
    outputs = tuple(o.name for o in graph.output)
    return OnnxInfo(path, _onnx_precision(model, meta), meta, inputs, outputs)


def _onnx_precision(model: Any, meta: dict[str, str]) -> str:
    from onnx import TensorProto

    fp8 = {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and any(a.name == "output_dtype" and a.i in fp8 for a in node.attribute):
            return "fp8"
    if any(t.data_type in fp8 for t in model.graph.initializer):
        return "fp8"
    if meta.get("rankserve.dtype") in PRECISION_OF_DTYPE:
        return PRECISION_OF_DTYPE[meta["rankserve.dtype"]]
    # Not our export: the float type most weights are stored in.
    names = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}
    counts: dict[str, int] = {}
    for t in model.graph.initializer:
        if t.data_type in names:
            size = 1
            for d in t.dims:
                size *= d
            counts[names[t.data_type]] = counts.get(names[t.data_type], 0) + size
    return max(counts, key=lambda k: counts[k]) if counts else "fp32"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def make_progress_monitor(trt: ModuleType, out: TextIO, min_interval: float = 2.0) -> Any:
    """A `trt.IProgressMonitor` printing phases (indented by depth) and, at most every `min_interval` seconds,
    steps. TensorRT calls it from several threads."""

    class ProgressMonitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._depth: dict[str, int] = {}
            self._steps: dict[str, int] = {}
            self._last = 0.0

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name] = depth
                self._steps[phase_name] = num_steps
                if depth <= 1:
                    print(f"{'  ' * depth}{phase_name} ({num_steps} steps)", file=out, flush=True)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                now = time.monotonic()
                if self._depth.get(phase_name, 0) <= 1 and now - self._last >= min_interval:
                    self._last = now
                    depth = self._depth.get(phase_name, 0)
                    total = self._steps.get(phase_name, 0)
                    print(f"{'  ' * depth}{phase_name}: {step + 1}/{total}", file=out, flush=True)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                depth = self._depth.pop(phase_name, 0)
                self._steps.pop(phase_name, None)
                if depth == 0:
                    print(f"{phase_name} done", file=out, flush=True)

    return ProgressMonitor()


def _parser_error(error: Any) -> str:
    """An `IParserError` (its node and description) or whatever the parser gave."""
    if hasattr(error, "desc"):
        node = error.node_name() if hasattr(error, "node_name") else ""
        return f"{node}: {error.desc()}" if node else str(error.desc())
    return str(error)


def _load_timing_cache(trt: ModuleType, config: Any, path: Path | None) -> Any:
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
        log.info("timing cache: %s (%d bytes)", path, len(data))
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):  # a cache from another GPU or TensorRT: start afresh
        log.warning("the timing cache %s does not match this GPU or TensorRT; starting an empty one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def _atomic_write(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
    tmp.replace(path)


def build_engine(
    onnx_path: Path,
    output_dir: Path,
    target: BuildTarget,
    *,
    gpu: GpuInfo,
    precision: str | None = None,
    timing_cache: Path | None = None,
    checkpoint_fingerprint: str | None = None,
    progress: TextIO | None = sys.stderr,
) -> EngineMetadata:
    """Build and write `output_dir/model.plan` and `output_dir/engine.json`; returns the metadata written."""
    trt = load_tensorrt()
    info = inspect_onnx(onnx_path)
    if precision is not None and precision != info.precision:
        hint = (
            "FP8 needs an ONNX quantized with NVIDIA ModelOpt (FP8 Q/DQ nodes); pass it with --onnx"
            if precision == "fp8"
            else f"export it with --dtype {DTYPE_OF_PRECISION.get(precision, precision)}"
        )
        raise BuildError(
            f"{onnx_path} is a {info.precision} graph and TensorRT builds strongly typed networks, whose precision "
            f"is the graph's: it cannot give a {precision} engine; {hint}"
        )
    if info.precision not in target.precisions:
        log.warning("%s lists precisions %s; building %s anyway", target.name, list(target.precisions), info.precision)
    if capabilities(target) and gpu.compute_capability not in capabilities(target):
        log.warning(
            "the target %s is for compute capability %s, this GPU (%s) is %s: the engine will run only on GPUs like "
            "this one",
            target.name,
            target.compute_capability,
            gpu.name,
            gpu.compute_capability,
        )
    missing = [n for n in (*INPUTS, OUTPUT) if n not in (*info.inputs, *info.outputs)]
    if missing:
        raise BuildError(f"{onnx_path} lacks {', '.join(missing)}: expected inputs {INPUTS} and output {OUTPUT!r}")
    export_max = int(info.metadata.get("rankserve.max_length", 0) or 0)
    profiles = target.profiles()
    if export_max and profiles[-1].max[1] > export_max:
        raise BuildError(
            f"the profiles reach {profiles[-1].max[1]} tokens but {onnx_path} was exported for at most {export_max}"
        )
    fingerprint = checkpoint_fingerprint or info.metadata.get("rankserve.checkpoint_fingerprint", "")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # required on 10.x, accepted and ignored on 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    started = time.monotonic()
    if not parser.parse_from_file(str(onnx_path)):  # reads external data next to the file
        errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors or 'no error given'}")
    log.info("parsed %s in %.1fs", onnx_path, time.monotonic() - started)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, target.workspace_bytes)
    if target.optimization_level is not None:
        config.builder_optimization_level = target.optimization_level
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name in INPUTS:
            trt_profile.set_shape(name, profile.min, profile.opt, profile.max)
        config.add_optimization_profile(trt_profile)
    cache = _load_timing_cache(trt, config, timing_cache)
    monitor = None
    if progress is not None:
        monitor = make_progress_monitor(trt, progress)
        config.progress_monitor = monitor

    print(
        f"building a {info.precision} TensorRT {trt.__version__} engine for {gpu.name} (sm {gpu.compute_capability}), "
        f"{len(profiles)} profiles up to {profiles[-1].max[1]} tokens; this takes minutes",
        file=progress or sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError("TensorRT could not build the engine (its log above says why)")
    log.info("built in %.0fs", time.monotonic() - started)

    output_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(output_dir / PLAN_FILE, plan)
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(timing_cache, (config.get_timing_cache() or cache).serialize())
    meta = EngineMetadata(
        tensorrt_version=trt.__version__,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        precision=info.precision,
        profiles=tuple(profiles),
        checkpoint_fingerprint=fingerprint,
        model_id=info.metadata.get("rankserve.model_id", ""),
        max_length=export_max,
        batch_tokens=target.max_batch_tokens,
        target=target.name,
        onnx_sha256=file_sha256(onnx_path),
        built_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    write_metadata(output_dir, meta)
    del monitor  # TensorRT needs it alive until the build returns
    return meta


def profiles_summary(profiles: Sequence[Profile]) -> str:
    return ", ".join(f"≤{p.max[0]}×{p.max[1]}" for p in profiles)

"""The TensorRT engine: a plan built by `rankserve build-engine`, one execution context per optimization profile,
each on its own CUDA stream; every batch runs on the smallest profile that covers its shape.

torch supplies the CUDA buffers and streams (`data_ptr()` and `cuda_stream` are what TensorRT takes).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from rankserve.engines.base import EngineInfo, EngineOutOfMemory
from rankserve.model.checkpoint import Checkpoint
from rankserve.tensorrt import load_tensorrt
from rankserve.tensorrt.build import DTYPE_OF_PRECISION, INPUTS, OUTPUT, profiles_summary
from rankserve.tensorrt.metadata import (
    PLAN_FILE,
    EngineIncompatible,
    EngineMetadata,
    GpuInfo,
    check_compatible,
    read_metadata,
)
from rankserve.tensorrt.profiles import Profile, ShapeLimits, shape_limits, split_rows

log = logging.getLogger(__name__)


def _torch_dtypes(trt: ModuleType) -> dict[Any, torch.dtype]:
    names = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64}  # fmt: skip
    return {getattr(trt.DataType, n): t for n, t in names.items() if hasattr(trt.DataType, n)}


def engine_profiles(trt_engine: Any, tensor: str = INPUTS[0]) -> list[Profile]:
    """The optimization profiles as the built engine holds them (what the scheduler must fit)."""
    profiles = []
    for index in range(trt_engine.num_optimization_profiles):
        lo, opt, hi = (tuple(int(d) for d in dims) for dims in trt_engine.get_tensor_profile_shape(tensor, index))
        profiles.append(Profile(lo, opt, hi))  # type: ignore[arg-type]
    return profiles


class TensorRTEngine:
    def __init__(
        self,
        trt: ModuleType,
        trt_engine: Any,
        meta: EngineMetadata,
        *,
        device: torch.device,
        pad_token_id: int,
        max_length: int | None = None,
        keep_alive: Sequence[Any] = (),
    ) -> None:
        self.trt = trt
        self.trt_engine = trt_engine
        self.meta = meta
        self.device = device
        self._keep_alive = tuple(keep_alive)  # the runtime and logger must outlive the engine
        self.profiles = engine_profiles(trt_engine)
        self.limits: ShapeLimits = shape_limits(self.profiles)
        dtypes = _torch_dtypes(trt)
        try:
            self._dtypes = {name: dtypes[trt_engine.get_tensor_dtype(name)] for name in (*INPUTS, OUTPUT)}
        except KeyError as e:
            raise EngineIncompatible(f"the engine's I/O tensors have an unsupported data type: {e}") from None
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "ON_PROFILE_CHANGE", None)
        self._contexts = []
        self._streams: list[torch.cuda.Stream | None] = []
        for index in range(len(self.profiles)):
            # ON_PROFILE_CHANGE: each context holds activation memory for its own profile, not for the largest.
            context = (
                trt_engine.create_execution_context()
                if strategy is None
                else trt_engine.create_execution_context(strategy)
            )
            if context is None:
                raise EngineOutOfMemory(f"TensorRT could not create an execution context for profile {index}")
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            if not context.set_optimization_profile_async(index, self._handle(stream)):
                raise EngineIncompatible(f"TensorRT refused optimization profile {index} for its execution context")
            self._contexts.append(context)
            self._streams.append(stream)
        for stream in self._streams:
            if stream is not None:
                stream.synchronize()
        limit = self.limits.max_length if max_length is None else min(max_length, self.limits.max_length)
        self.info = EngineInfo(
            backend="tensorrt",
            device=str(device),
            precision=DTYPE_OF_PRECISION.get(meta.precision, meta.precision),
            max_length=limit,
            pad_token_id=pad_token_id,
            preferred_batch_tokens=min(meta.batch_tokens or self.limits.max_batch_tokens, self.limits.max_batch_tokens),
            max_batch_size=self.limits.max_batch_size,
            max_batch_tokens=self.limits.max_batch_tokens,
        )

    @staticmethod
    def _handle(stream: torch.cuda.Stream | None) -> int:
        return 0 if stream is None else int(stream.cuda_stream)

    @classmethod
    def from_directory(
        cls,
        directory: str | Path,
        ckpt: Checkpoint,
        *,
        device: str = "cuda",
        max_length: int | None = None,
        gpu: GpuInfo | None = None,
    ) -> TensorRTEngine:
        """Load `directory/model.plan` after checking `engine.json` against this GPU, TensorRT and checkpoint.

        `device` is a CUDA device; `cpu` with an explicit `gpu` exists only for the tests' fake TensorRT.
        """
        directory = Path(directory)
        trt = load_tensorrt()
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"the tensorrt backend needs a CUDA GPU; PyTorch sees none (device {device!r})")
            dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
            gpu = gpu or GpuInfo.current(dev.index or 0)
        elif gpu is None:
            raise RuntimeError(f"the tensorrt backend needs a CUDA device, not {device!r}")
        meta = read_metadata(directory)
        check_compatible(meta, tensorrt_version=trt.__version__, gpu=gpu, fingerprint=ckpt.fingerprint)
        if meta.gpu_name != gpu.name:
            log.warning("the engine was built on %s and runs on %s (same compute capability)", meta.gpu_name, gpu.name)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            trt_engine = runtime.deserialize_cuda_engine((directory / PLAN_FILE).read_bytes())
            if trt_engine is None:
                raise EngineIncompatible(f"TensorRT could not deserialize {directory / PLAN_FILE} (its log says why)")
            limit = min(max_length or ckpt.config.max_length, ckpt.config.max_length)
            engine = cls(
                trt,
                trt_engine,
                meta,
                device=dev,
                pad_token_id=ckpt.config.pad_token_id,
                max_length=limit,
                keep_alive=(runtime, logger),
            )
        log.info(
            "TensorRT %s engine %s: %s, profiles %s",
            trt.__version__,
            directory,
            meta.precision,
            profiles_summary(engine.profiles),
        )
        return engine

    def score(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        batch, seq = input_ids.shape
        logits = np.empty(batch, dtype=np.float32)
        try:
            for start, stop, index in split_rows(self.profiles, batch, seq):
                logits[start:stop] = self._run(index, input_ids[start:stop], lengths[start:stop])
        except torch.cuda.OutOfMemoryError as e:
            raise EngineOutOfMemory(f"{self.device} out of memory on a batch of {input_ids.shape}") from e
        return logits

    def _run(self, index: int, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        context, stream = self._contexts[index], self._streams[index]
        batch, seq = input_ids.shape
        # The scheduler's worker thread calls this: make the engine's GPU current there, and use the profile's stream.
        with contextlib.ExitStack() as scope:
            if stream is not None:
                scope.enter_context(torch.cuda.device(self.device))
                scope.enter_context(torch.cuda.stream(stream))
            ids = torch.from_numpy(np.ascontiguousarray(input_ids)).to(self.device, self._dtypes[INPUTS[0]])
            lens = torch.from_numpy(np.ascontiguousarray(lengths)).to(self.device)
            positions = torch.arange(seq, device=self.device)
            mask = (positions[None, :] < lens[:, None]).to(self._dtypes[INPUTS[1]])
            for name in INPUTS:
                if not context.set_input_shape(name, (batch, seq)):
                    raise RuntimeError(f"profile {index} refused the shape {(batch, seq)} for {name}")
            out = torch.empty(tuple(context.get_tensor_shape(OUTPUT)), dtype=self._dtypes[OUTPUT], device=self.device)
            for name, tensor in zip((*INPUTS, OUTPUT), (ids, mask, out), strict=True):
                context.set_tensor_address(name, tensor.data_ptr())
            if not context.execute_async_v3(self._handle(stream)):
                raise RuntimeError(f"TensorRT failed on a batch of {(batch, seq)} (profile {index}; its log says why)")
            if stream is not None:
                stream.synchronize()
            return out.reshape(-1).float().cpu().numpy()

    def warmup(self) -> None:
        """Each profile's context once at its smallest and its optimal shape (first-run costs, lazy allocations)."""
        for profile in self.profiles:
            for batch, seq in {profile.min, profile.opt}:
                seq = min(seq, self.info.max_length)
                if seq < profile.min[1]:
                    continue
                ids = np.full((batch, seq), self.info.pad_token_id, dtype=np.int64)
                self.score(ids, np.full(batch, seq, dtype=np.int64))

"""A small fake of the `tensorrt` module's Python surface, for testing rankserve's TensorRT code without TensorRT.

It mirrors the documented TensorRT 10.x/11 API that rankserve calls, and checks its use as TensorRT would
(profiles set for every input and min <= opt <= max, shapes inside the active profile, an address for every I/O
tensor, plans only deserialized by the version that built them). "Building" serializes the profiles and the parsed
graph, weights included (a plan needs no ONNX files); "executing" runs that graph with onnxruntime on the host
memory behind the tensor addresses, so the engine's buffer handling is exercised for real. Engines here run on CPU
tensors (`data_ptr()` of host memory).
"""

from __future__ import annotations

import base64
import ctypes
import enum
import json
import sys
import types
from typing import Any

import numpy as np

__version__ = "10.13.0.35"


class Logger:
    WARNING = 2
    INFO = 3

    def __init__(self, severity: int = WARNING) -> None:
        self.severity = severity


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    BOOL = 4
    INT64 = 8
    BF16 = 7


class TensorIOMode(enum.IntEnum):
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32, DataType.INT64: np.int64}
_ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 16: DataType.BF16, 6: DataType.INT32, 7: DataType.INT64}


class IProgressMonitor:
    def __init__(self) -> None:
        pass


class ITensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []
        self.onnx_path: str | None = None
        self.onnx_bytes = b""

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> ITensor:
        return self.inputs[i]


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self.network = network
        self.errors: list[str] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        import onnx

        try:
            model = onnx.load(path)  # with external data, as TensorRT reads it
            onnx.checker.check_model(model)
        except Exception as e:
            self.errors.append(f"cannot parse {path}: {e}")
            return False

        def tensors(values: Any) -> list[ITensor]:
            out = []
            for v in values:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
                out.append(ITensor(v.name, dims, _ONNX_TYPES[v.type.tensor_type.elem_type]))
            return out

        self.network.inputs = tensors(model.graph.input)
        self.network.outputs = tensors(model.graph.output)
        self.network.onnx_path = path
        self.network.onnx_bytes = model.SerializeToString()  # weights included: a plan needs no ONNX files
        return True


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:
        shapes = tuple(tuple(int(d) for d in s) for s in (min, opt, max))
        lo, mid, hi = shapes
        if not all(a <= b <= c for a, b, c in zip(lo, mid, hi, strict=True)):
            raise ValueError(f"profile for {name}: min <= opt <= max violated: {shapes}")
        self.shapes[name] = shapes


class ITimingCache:
    def __init__(self, data: bytes) -> None:
        self.entries = json.loads(data or b"{}")

    def serialize(self) -> bytes:
        return json.dumps(self.entries).encode()


class IBuilderConfig:
    def __init__(self) -> None:
        self.pools: dict[MemoryPoolType, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None
        self.progress_monitor: IProgressMonitor | None = None
        self.builder_optimization_level = 3

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pools[pool] = int(size)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> ITimingCache:
        return ITimingCache(data)

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if cache.entries and cache.entries.get("version") != __version__ and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self.timing_cache


class Builder:
    builds = 0  # how many engines were built in this process (tests check "build once")

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes | None:
        if not network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)):
            return None  # as TensorRT 11: weakly typed networks are gone
        if not config.profiles or MemoryPoolType.WORKSPACE not in config.pools:
            return None
        names = {t.name for t in network.inputs}
        for profile in config.profiles:
            if set(profile.shapes) != names:
                return None  # every dynamic input needs a shape in every profile
        monitor = config.progress_monitor
        if monitor is not None:
            monitor.phase_start("Building engine", None, len(config.profiles))
            for i in range(len(config.profiles)):
                monitor.phase_start("Tactic selection", "Building engine", 2)
                monitor.step_complete("Tactic selection", 0)
                monitor.step_complete("Tactic selection", 1)
                monitor.phase_finish("Tactic selection")
                if not monitor.step_complete("Building engine", i):
                    return None
            monitor.phase_finish("Building engine")
        if config.timing_cache is not None:
            config.timing_cache.entries = {"version": __version__, "tactics": len(config.profiles)}
        Builder.builds += 1
        plan = {
            "version": __version__,
            "onnx": network.onnx_path,
            "model": base64.b64encode(network.onnx_bytes).decode(),
            "inputs": [[t.name, int(t.dtype)] for t in network.inputs],
            "outputs": [[t.name, int(t.dtype)] for t in network.outputs],
            "profiles": [{k: v for k, v in p.shapes.items()} for p in config.profiles],
        }
        return json.dumps(plan).encode()


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes) -> ICudaEngine | None:
        try:
            plan = json.loads(bytes(data))
        except ValueError:
            return None
        if plan.get("version") != __version__:
            return None  # TensorRT refuses plans of another version
        return ICudaEngine(plan)


class ICudaEngine:
    def __init__(self, plan: dict[str, Any]) -> None:
        import onnxruntime

        self.plan = plan
        model = base64.b64decode(plan["model"])
        self.session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
        self.io = {name: (TensorIOMode.INPUT, DataType(t)) for name, t in plan["inputs"]}
        self.io |= {name: (TensorIOMode.OUTPUT, DataType(t)) for name, t in plan["outputs"]}
        self.contexts: list[IExecutionContext] = []

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.plan["profiles"])

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    def get_tensor_name(self, i: int) -> str:
        return list(self.io)[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.io[name][0]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.io[name][1]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self.plan["profiles"][profile_index][name]]

    def create_execution_context(self, strategy: ExecutionContextAllocationStrategy | None = None) -> Any:
        context = IExecutionContext(self)
        self.contexts.append(context)
        return context


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.profile = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.runs: list[tuple[int, tuple[int, ...], int]] = []  # (profile, input shape, stream) per execution

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.profile = index
        self.shapes.clear()
        return True

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = tuple(int(d) for d in shape)
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        if not all(a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
            return False  # TensorRT logs an error and refuses a shape outside the active profile
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
            return self.shapes[name]
        batch = self.shapes[self.engine.get_tensor_name(0)][0]
        return (batch,)

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = int(address)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        inputs = [n for n, (mode, _) in self.engine.io.items() if mode == TensorIOMode.INPUT]
        if set(self.shapes) != set(inputs) or set(self.addresses) != set(self.engine.io):
            return False
        feeds = {}
        for name in inputs:
            dtype = np.dtype(_NP[self.engine.get_tensor_dtype(name)])
            count = int(np.prod(self.shapes[name]))
            buffer = (ctypes.c_byte * (count * dtype.itemsize)).from_address(self.addresses[name])
            feeds[name] = np.frombuffer(buffer, dtype=dtype).reshape(self.shapes[name]).copy()
        (result,) = self.engine.session.run(None, feeds)
        out_name = next(n for n, (mode, _) in self.engine.io.items() if mode == TensorIOMode.OUTPUT)
        result = np.ascontiguousarray(result, dtype=_NP[self.engine.get_tensor_dtype(out_name)])
        ctypes.memmove(self.addresses[out_name], result.ctypes.data, result.nbytes)
        self.runs.append((self.profile, self.shapes[inputs[0]], stream_handle))
        return True


def install(monkeypatch: Any, version: str = __version__) -> types.ModuleType:
    """Make `import tensorrt` give this fake (at `version`) for one test."""
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "__version__", version)
    monkeypatch.setattr(Builder, "builds", 0)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module

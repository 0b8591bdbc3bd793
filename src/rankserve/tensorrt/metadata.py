"""The metadata file written next to a plan, and the checks that refuse an engine built for something else.

A TensorRT plan runs only with the TensorRT version that built it and on GPUs of the compute capability it was
built for; it also bakes in the weights it was built from. `engine.json` records all three so that a mismatch is
a clear message at start-up, not a deserialization failure or, worse, another model's scores.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rankserve.tensorrt import version_tuple
from rankserve.tensorrt.profiles import Profile

PLAN_FILE = "model.plan"
METADATA_FILE = "engine.json"
FORMAT = 1
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")


class EngineIncompatible(RuntimeError):
    """This engine cannot serve here (other GPU, other TensorRT, other weights) or its files are unusable."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"

    @classmethod
    def current(cls, device_index: int = 0) -> GpuInfo:
        import torch

        major, minor = torch.cuda.get_device_capability(device_index)
        return cls(torch.cuda.get_device_name(device_index), f"{major}.{minor}")


@dataclass(frozen=True)
class EngineMetadata:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profiles: tuple[Profile, ...]
    checkpoint_fingerprint: str
    model_id: str = ""
    max_length: int = 0  # the ONNX export's maximum sequence length
    batch_tokens: int = 0  # the token budget the profiles were planned for
    target: str = ""  # configs/<target>.yaml, when built from one
    onnx_sha256: str = ""
    built_at: str = ""

    def to_json(self) -> str:
        data = asdict(self)
        data["profiles"] = [p.to_dict() for p in self.profiles]
        return json.dumps({"format": FORMAT, **data}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = METADATA_FILE) -> EngineMetadata:
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            if data.pop("format", None) != FORMAT:
                raise ValueError(f"unknown metadata format (this rankserve reads format {FORMAT})")
            data["profiles"] = tuple(Profile.from_dict(p) for p in data["profiles"])
            known = set(cls.__dataclass_fields__)
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError, KeyError) as e:
            raise EngineIncompatible(f"{source} is not rankserve engine metadata: {e}") from None


def write_metadata(directory: Path, meta: EngineMetadata) -> Path:
    path = directory / METADATA_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(meta.to_json(), encoding="utf-8")
    tmp.replace(path)
    return path


def read_metadata(directory: Path) -> EngineMetadata:
    path = directory / METADATA_FILE
    if not (directory / PLAN_FILE).is_file():
        raise EngineIncompatible(f"{directory} holds no {PLAN_FILE}: build one with `rankserve build-engine`")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise EngineIncompatible(f"cannot read {path} ({e}): rebuild the engine (rankserve build-engine)") from None
    return EngineMetadata.from_json(text, str(path))


def incompatibility(
    meta: EngineMetadata, *, tensorrt_version: str, gpu: GpuInfo, fingerprint: str | None = None
) -> str | None:
    """Why this engine cannot run here, or None if it can."""
    if version_tuple(meta.tensorrt_version) != version_tuple(tensorrt_version):
        return (
            f"the engine was built with TensorRT {meta.tensorrt_version}, this is TensorRT {tensorrt_version}; "
            "plans run only on the TensorRT version that built them: rebuild it here"
        )
    if meta.compute_capability != gpu.compute_capability:
        return (
            f"the engine was built for {meta.gpu_name} (compute capability {meta.compute_capability}), this GPU is "
            f"{gpu.name} (compute capability {gpu.compute_capability}): rebuild it on this GPU"
        )
    if fingerprint is not None and meta.checkpoint_fingerprint != fingerprint:
        return (
            f"the engine was built from checkpoint {meta.checkpoint_fingerprint}, the served checkpoint is "
            f"{fingerprint} (other weights, or the files were rewritten): rebuild it from this checkpoint"
        )
    return None


def check_compatible(
    meta: EngineMetadata, *, tensorrt_version: str, gpu: GpuInfo, fingerprint: str | None = None
) -> None:
    reason = incompatibility(meta, tensorrt_version=tensorrt_version, gpu=gpu, fingerprint=fingerprint)
    if reason is not None:
        raise EngineIncompatible(reason)

"""Build targets: `configs/<target>.yaml`, one per GPU class, read as a server preset and as a build profile.

The server keys (`max_batch_size`, `max_batch_tokens`, `max_seq_length`, ...) are `rankserve serve` settings; the
`build:` section holds what only `rankserve build-engine` reads. The profiles are planned from both, so the engine's
shapes and the scheduler's batches come from the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankserve.engines.torch_options import CUDA_BATCH_TOKENS  # the PyTorch CUDA engine's default budget
from rankserve.tensorrt.metadata import PRECISIONS
from rankserve.tensorrt.profiles import DEFAULT_BUCKETS, Profile, plan_profiles

BUILD_KEY = "build"  # the section of a preset that `rankserve serve` ignores
BUILD_KEYS = {"gpus", "compute_capability", "precision", "precisions", "sequence_buckets", "workspace_gib",
              "optimization_level"}  # fmt: skip


class TargetError(ValueError):
    """A build target file that cannot be used."""


@dataclass(frozen=True)
class BuildTarget:
    name: str
    precision: str
    precisions: tuple[str, ...]
    max_batch_size: int
    max_batch_tokens: int
    max_seq_length: int
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    workspace_bytes: int = 8 << 30
    gpus: tuple[str, ...] = ()
    compute_capability: str | None = None
    optimization_level: int | None = None  # TensorRT's builder_optimization_level; None: TensorRT's default (3)

    def profiles(self) -> list[Profile]:
        return plan_profiles(
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            max_seq_length=self.max_seq_length,
            buckets=self.buckets,
        )

    def matches_gpu(self, gpu_name: str) -> bool:
        return any(g.lower() in gpu_name.lower() for g in self.gpus)


def load_target(path: str | Path) -> BuildTarget:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise TargetError(f"cannot read the build profile {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get(BUILD_KEY), dict):
        raise TargetError(f"{path} has no `{BUILD_KEY}:` section (see configs/h100.yaml for the format)")
    return target_from_mapping(path.stem, data)


def target_from_mapping(name: str, data: dict[str, Any]) -> BuildTarget:
    build = dict(data.get(BUILD_KEY) or {})
    unknown = sorted(set(build) - BUILD_KEYS)
    if unknown:
        raise TargetError(f"{name}: unknown build keys {', '.join(unknown)} (known: {', '.join(sorted(BUILD_KEYS))})")
    precisions = tuple(build.get("precisions") or [build.get("precision", "bf16")])
    precision = build.get("precision", precisions[0])
    for p in (precision, *precisions):
        if p not in PRECISIONS:
            raise TargetError(f"{name}: precision {p!r} is not one of {', '.join(PRECISIONS)}")
    if precision not in precisions:
        raise TargetError(f"{name}: precision {precision} is not among the target's precisions {list(precisions)}")
    try:
        target = BuildTarget(
            name=name,
            precision=precision,
            precisions=precisions,
            max_batch_size=int(data.get("max_batch_size", 64)),
            max_batch_tokens=int(data.get("max_batch_tokens") or CUDA_BATCH_TOKENS),
            max_seq_length=int(data.get("max_seq_length", 8192)),
            buckets=tuple(int(b) for b in build.get("sequence_buckets", DEFAULT_BUCKETS)),
            workspace_bytes=int(float(build.get("workspace_gib", 8)) * (1 << 30)),
            gpus=tuple(str(g) for g in build.get("gpus", ())),
            compute_capability=_capability(build.get("compute_capability")),
            optimization_level=None if build.get("optimization_level") is None else int(build["optimization_level"]),
        )
        target.profiles()  # plan once: bad numbers fail here, naming the file
    except (TypeError, ValueError) as e:
        raise TargetError(f"{name}: {e}") from None
    return target


def _capability(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def capabilities(target: BuildTarget) -> Sequence[str]:
    return [] if target.compute_capability is None else target.compute_capability.split(",")

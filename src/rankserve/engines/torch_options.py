"""How the PyTorch engine runs on CUDA. Torch-free, so that settings and the runtime can build it cheaply."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal

# Padded tokens per batch on CUDA (the engine's preferred budget; TensorRT's auto-built profiles are planned for
# it too): a starting point until GPU measurements set it (scripts/gpu_check.sh sweeps it).
CUDA_BATCH_TOKENS = 16384


@dataclass(frozen=True)
class TorchOptions:
    """How the engine runs on CUDA (ignored on CPU, which always runs the padded reference)."""

    # No compute on padding. auto: on CUDA (CPU runs the padded reference); on: everywhere (tests); off: nowhere.
    packed: Literal["auto", "on", "off"] = "auto"
    attention: Literal["auto", "varlen", "sdpa"] = "auto"  # auto: varlen where PyTorch has it
    cuda_graphs: bool = False  # graphs for packed batches of <= graph_max_tokens, captured at warm-up
    graph_max_tokens: int = 4096
    graph_step: int = 256  # bucket granularity: at most step-1 tokens of filler per batch
    graph_max_batch: int = 64  # sequences per graph batch (the scheduler's max_batch_size default)
    compile: bool = False  # torch.compile the packed forward (dynamic shapes)
    fp8: bool = False  # FP8 (e4m3) GEMMs with per-row scales: Hopper/Ada GPUs only

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TorchOptions:
        """`RANKSERVE_TORCH_<FIELD>` (e.g. RANKSERVE_TORCH_CUDA_GRAPHS=1, RANKSERVE_TORCH_ATTENTION=sdpa)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"RANKSERVE_TORCH_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            default = getattr(cls, f.name)
            if isinstance(default, bool):
                if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(f"RANKSERVE_TORCH_{f.name.upper()} must be a boolean, got {raw!r}")
                values[f.name] = raw.lower() in ("1", "true", "yes", "on")
            elif isinstance(default, int):
                values[f.name] = int(raw)
            else:
                values[f.name] = raw
        opts = cls(**values)  # type: ignore[arg-type]
        if opts.attention not in ("auto", "varlen", "sdpa"):
            raise ValueError(f"RANKSERVE_TORCH_ATTENTION must be auto, varlen or sdpa, got {opts.attention!r}")
        if opts.packed not in ("auto", "on", "off"):
            raise ValueError(f"RANKSERVE_TORCH_PACKED must be auto, on or off, got {opts.packed!r}")
        return opts

    @classmethod
    def from_settings(cls, settings: object) -> TorchOptions:
        """The `torch_*` fields of `rankserve.settings.Settings`; a CUDA graph holds up to `max_batch_size`."""
        return cls(
            packed=settings.torch_packed,  # type: ignore[attr-defined]
            attention=settings.torch_attention,  # type: ignore[attr-defined]
            cuda_graphs=settings.torch_cuda_graphs,  # type: ignore[attr-defined]
            compile=settings.torch_compile,  # type: ignore[attr-defined]
            fp8=settings.torch_fp8,  # type: ignore[attr-defined]
            graph_max_batch=settings.max_batch_size,  # type: ignore[attr-defined]
        )

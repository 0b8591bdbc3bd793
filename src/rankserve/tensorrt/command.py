"""`rankserve build-engine`: a TensorRT engine for this GPU from a checkpoint (exported to ONNX on the way) or from
an ONNX export, with the optimization profiles of a `configs/<gpu>.yaml` target."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from rankserve.tensorrt.metadata import GpuInfo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory or Hugging Face id (exported to ONNX first)")
    source.add_argument("--onnx", help="an ONNX export: its directory (model.onnx) or the .onnx file")
    parser.add_argument("--profile", required=True, help="build target, e.g. configs/h100.yaml")
    parser.add_argument("--output", required=True, help="directory for model.plan and engine.json")
    parser.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16", "fp8"],
        help="default: the target's precision (--model) or the ONNX graph's (--onnx)",
    )
    parser.add_argument(
        "--timing-cache", help="TensorRT timing cache file, reused across builds [default: OUTPUT/timing.cache]"
    )
    parser.add_argument("--workspace-gib", type=float, help="builder workspace limit (overrides the target's)")
    parser.add_argument(
        "--keep-onnx", action="store_true", help="keep the ONNX export (OUTPUT/onnx) after a --model build"
    )
    parser.add_argument("--quiet", action="store_true", help="no build progress")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except Exception as e:
        from rankserve.errors import RankserveError
        from rankserve.tensorrt import TensorRTUnavailable
        from rankserve.tensorrt.build import BuildError
        from rankserve.tensorrt.metadata import EngineIncompatible
        from rankserve.tensorrt.targets import TargetError

        if isinstance(e, (BuildError, EngineIncompatible, TargetError, TensorRTUnavailable)):
            print(f"rankserve build-engine: {e}", file=sys.stderr)
            return 2
        if isinstance(e, RankserveError):
            print(f"rankserve build-engine: {e.message}", file=sys.stderr)
            return 2
        raise


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from rankserve.tensorrt import load_tensorrt
    from rankserve.tensorrt.build import DTYPE_OF_PRECISION, BuildError, build_engine, onnx_file, profiles_summary
    from rankserve.tensorrt.targets import load_target

    target = load_target(args.profile)
    if args.workspace_gib is not None:
        target = dataclasses.replace(target, workspace_bytes=int(args.workspace_gib * (1 << 30)))
    load_tensorrt()  # fail before a long export when TensorRT is missing
    gpu = _gpu()
    output = Path(args.output)
    timing = Path(args.timing_cache) if args.timing_cache else output / "timing.cache"
    progress = None if args.quiet else sys.stderr

    exported: Path | None = None
    fingerprint = None
    precision = args.precision
    if args.model:
        from rankserve.export.onnx import export_onnx
        from rankserve.model.checkpoint import open_checkpoint

        precision = precision or target.precision
        if precision == "fp8":
            raise BuildError(
                "an fp8 engine needs an ONNX quantized with NVIDIA ModelOpt (FP8 Q/DQ nodes): quantize the bf16 "
                "export with ModelOpt and pass it with --onnx (docs/tensorrt.md)"
            )
        ckpt = open_checkpoint(args.model)
        fingerprint = ckpt.fingerprint
        exported = output / "onnx"
        print(f"exporting {ckpt.path} to ONNX ({precision}) in {exported}", file=sys.stderr, flush=True)
        path = export_onnx(ckpt, exported, dtype=DTYPE_OF_PRECISION[precision], progress=not args.quiet)
    else:
        path = onnx_file(args.onnx)
    try:
        meta = build_engine(
            path,
            output,
            target,
            gpu=gpu,
            precision=precision,
            timing_cache=timing,
            checkpoint_fingerprint=fingerprint,
            progress=progress,
        )
    finally:
        if exported is not None and not args.keep_onnx:
            shutil.rmtree(exported, ignore_errors=True)
    print(
        f"wrote {output}/model.plan: TensorRT {meta.tensorrt_version}, {meta.gpu_name} (sm {meta.compute_capability}), "
        f"{meta.precision}, profiles {profiles_summary(meta.profiles)}; serve it with "
        f"`rankserve serve --backend tensorrt --tensorrt-engine {output} --model ...`"
    )
    return 0


def _gpu() -> GpuInfo:
    try:
        import torch
    except ImportError:
        raise RuntimeError("build-engine needs PyTorch with CUDA") from None
    if not torch.cuda.is_available():
        from rankserve.tensorrt.build import BuildError

        raise BuildError("no CUDA GPU visible: TensorRT builds an engine for the GPU it runs on")
    return GpuInfo.current(torch.cuda.current_device())

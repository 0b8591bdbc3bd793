"""`rankserve export onnx --model PATH_OR_ID --output DIR [--dtype fp32|fp16|bf16] [--opset N] [--int8]`.

Imports only the standard library until it runs (the CLI builds its parser without torch or onnx).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", required=True)
    p = formats.add_parser("onnx", help="the ONNX graph (docs/onnx.md): TensorRT's input and the onnxruntime backend's")
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face id")
    p.add_argument("--output", required=True, help="folder for model.onnx (and model.onnx.data for large graphs)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weight precision [fp32]")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 20)")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx (dynamic int8, for CPU; fp32 only)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rankserve.errors import RankserveError
    from rankserve.export.onnx import DEFAULT_OPSET, export_onnx, read_onnx_metadata
    from rankserve.model.checkpoint import open_checkpoint

    if args.int8 and args.dtype != "fp32":
        print("rankserve: --int8 quantizes the fp32 graph: use it with --dtype fp32", file=sys.stderr)
        return 2
    if args.opset is not None and not 18 <= args.opset <= 23:
        message = f"--opset must be between 18 and 23 (default {DEFAULT_OPSET}), got {args.opset}"
        print(f"rankserve: {message}", file=sys.stderr)
        return 2
    try:
        ckpt = open_checkpoint(args.model)
    except RankserveError as e:
        print(f"rankserve: {e.message}", file=sys.stderr)
        return 2
    path = export_onnx(ckpt, Path(args.output), dtype=args.dtype, opset=args.opset, progress=not args.quiet)
    if args.int8:
        from rankserve.engines.onnxruntime_engine import ensure_int8

        print(f"int8: {ensure_int8(path)}", file=sys.stderr)
    meta = read_onnx_metadata(path)
    print(path)
    if not args.quiet:
        print("metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(meta.items())), file=sys.stderr)
    return 0

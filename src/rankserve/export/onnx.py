"""The ONNX graph of the reranker, exported from `rankserve.model.llama.Reranker` (never a second model).

The file contract (the ONNX Runtime engine and the TensorRT builder both read it; docs/onnx.md):
- inputs `input_ids` int64 `[batch, sequence]`, right-padded with the checkpoint's pad id, and `attention_mask`
  int64 `[batch, sequence]`, 1 for real tokens (a prefix of each row); output `logits` float32 `[batch]`;
- `output_dir/model.onnx`, its weights in `model.onnx.data` beside it when the graph is large (protobuf's 2 GB);
- `metadata_props`: `rankserve.model_id`, `.max_length`, `.template_version`, `.dtype`, `.checkpoint_fingerprint`,
  `.opset`.

Attention is exported as plain ONNX ops (MatMul, Add, Softmax, MatMul) with the key-padding mask as a `[batch, 1, 1,
sequence]` additive bias that broadcasts over heads and query positions: no `[B, 1, S, S]` mask is ever built.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rankserve.model.checkpoint import Checkpoint

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
DEFAULT_OPSET = 20
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16"}
DTYPES["bf16"] = "bfloat16"
# Weights above this size go to the external data file (protobuf refuses messages over 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30
META = "rankserve."


def canonical_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of fp32, fp16, bf16 (or float32, float16, bfloat16), got {dtype!r}")
    return DTYPES[dtype]


def export_onnx(
    checkpoint: Checkpoint,
    output_dir: Path,
    *,
    dtype: str = "float32",
    opset: int | None = None,
    progress: bool = True,
) -> Path:
    """Export `checkpoint` to `output_dir/model.onnx` (written to a temporary folder first, then moved in place)."""
    import onnx
    import torch

    from rankserve.model.checkpoint import load_model
    from rankserve.ranker import PROMPT_TEMPLATE_VERSION

    dtype = canonical_dtype(dtype)
    opset = opset or DEFAULT_OPSET
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    say = _Progress(progress)

    with say.step(f"loading {checkpoint.path} in {dtype}"):
        model = load_model(checkpoint, device="cpu", dtype=getattr(torch, dtype))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    wrapper = _ids_and_mask(model).eval()
    # Example inputs: two rows of different lengths, so nothing specializes on one length or on a full mask.
    ids = torch.full((2, 16), checkpoint.config.pad_token_id, dtype=torch.int64)
    ids[:, 0] = checkpoint.config.bos_token_id
    mask = torch.zeros((2, 16), dtype=torch.int64)
    mask[0, :16], mask[1, :9] = 1, 1
    batch, sequence = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1)
    with say.step(f"tracing and translating to ONNX (opset {opset})"), _quiet(not progress):
        program = torch.onnx.export(
            wrapper,
            (ids, mask),
            dynamo=True,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
            opset_version=opset,
            custom_translation_table=_translations(),
            verbose=False,
            report=False,
        )
    metadata = {
        "model_id": checkpoint.config.name_or_path or str(checkpoint.path),
        "max_length": str(checkpoint.config.max_length),
        "template_version": PROMPT_TEMPLATE_VERSION,
        "dtype": dtype,
        "checkpoint_fingerprint": checkpoint.fingerprint,
        "opset": str(opset),
    }
    program.model.metadata_props.update({META + k: v for k, v in metadata.items()})
    program.model.producer_name = "rankserve"
    external = weight_bytes > EXTERNAL_DATA_BYTES
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=output_dir))
    try:
        what = f"{weight_bytes / 2**20:,.0f} MiB of weights" + (f" to {DATA_FILE}" if external else "")
        with say.step(f"saving {what}"):
            program.save(str(tmp / ONNX_FILE), external_data=external)
            if external and (tmp / ONNX_FILE).with_suffix(".onnx.data") != tmp / DATA_FILE:
                raise RuntimeError("the exporter named its external data file unexpectedly")
        del program, wrapper, model
        with say.step("checking the graph (onnx.checker)"):
            onnx.checker.check_model(str(tmp / ONNX_FILE))
        for name in (DATA_FILE, ONNX_FILE):  # the data first: a model.onnx never points at a missing file
            if (tmp / name).exists():
                os.replace(tmp / name, output_dir / name)
            elif name == DATA_FILE:
                (output_dir / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say.done(output_dir / ONNX_FILE)
    return output_dir / ONNX_FILE


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The `rankserve.*` metadata of an exported file, keys without the prefix (weights are not read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key.removeprefix(META): p.value for p in model.metadata_props if p.key.startswith(META)}


def _ids_and_mask(model: torch.nn.Module) -> torch.nn.Module:
    import torch

    class IdsAndMask(torch.nn.Module):
        """The graph's interface (ids + mask) onto the model's (ids + lengths): lengths = mask.sum(-1)."""

        def __init__(self, reranker: torch.nn.Module) -> None:
            super().__init__()
            self.reranker = reranker

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.reranker(input_ids, attention_mask.sum(-1))

    return IdsAndMask(model)


def _translations() -> dict[Any, Any]:
    """aten.scaled_dot_product_attention as four plain ops, with the boolean key mask as a broadcasting bias.

    torch's default translation adds a Where(IsNaN) over the whole `[B, H, S, S]` weights (for rows with no real
    key, which our masks never have: every row has its BOS); that costs two more `[B, H, S, S]` tensors on CPU.
    """
    import torch
    from onnxscript import ir
    from onnxscript import opset18 as op

    def attention(
        query: Any,
        key: Any,
        value: Any,
        attn_mask: Any = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Any:
        if is_causal or dropout_p or enable_gqa or attn_mask is None or attn_mask.dtype != ir.DataType.BOOL:
            raise NotImplementedError("the export expects bidirectional attention with a boolean key mask")
        head_dim = query.shape[-1]
        if not isinstance(head_dim, int):
            raise NotImplementedError("the export needs a static head_dim")
        factor = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        dtype = query.dtype
        q = op.Mul(query, op.Constant(value=ir.tensor(factor, dtype=dtype)))
        scores = op.MatMul(q, op.Transpose(key, perm=[0, 1, 3, 2]))
        zero = op.Constant(value=ir.tensor(0.0, dtype=dtype))
        # The dtype's lowest finite value (not -inf): a softmax over masked keys only stays finite.
        lowest = op.Constant(value=ir.tensor(dtype.min, dtype=dtype))
        bias = op.Where(attn_mask, zero, lowest)  # [B, 1, 1, S]: broadcasts, never [B, 1, S, S]
        weights = op.Softmax(op.Add(scores, bias), axis=-1)
        return op.MatMul(weights, value)

    return {torch.ops.aten.scaled_dot_product_attention.default: attention}


class _Progress:
    """Step lines with timings on stderr (the CLI) or the log (export on demand)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.perf_counter()

    def _say(self, text: str) -> None:
        if self.enabled:
            print(f"[export] {text}", file=sys.stderr, flush=True)
        else:
            log.info("onnx export: %s", text)

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        self._say(f"{text} ...")
        started = time.perf_counter()
        yield
        self._say(f"{text}: done in {time.perf_counter() - started:.1f}s")

    def done(self, path: Path) -> None:
        self._say(f"wrote {path} in {time.perf_counter() - self.started:.1f}s")


@contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence torch.onnx's own progress prints (stdout) when exporting on demand inside a server, and always its
    INFO logs: the exporter's graph passes log every deduplicated initializer (dozens of lines in a server's log,
    also when `--backend auto` builds a TensorRT engine at start-up)."""
    import contextlib
    import io
    import warnings

    chatty = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in chatty]
    with contextlib.ExitStack() as scope:
        if enabled:
            scope.enter_context(warnings.catch_warnings())
            scope.enter_context(contextlib.redirect_stdout(io.StringIO()))
            warnings.simplefilter("ignore")
        for logger in chatty:
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
        try:
            yield
        finally:
            for logger, level in zip(chatty, levels, strict=True):
                logger.setLevel(level)

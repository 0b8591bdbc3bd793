"""The ONNX Runtime engine (CPU): runs the exported graph of `rankserve.export.onnx`, exporting it on demand.

Where the graph comes from, first match wins:
1. `<cache>/<fingerprint>-<dtype>/model.onnx`, where `<cache>` is `onnx_cache_dir` or `<checkpoint>/onnx`,
   used when its metadata names this checkpoint's fingerprint, dtype and prompt-template version;
2. otherwise it is exported there now (logged; seconds for small checkpoints, minutes for the full model).
With `int8`, `model.int8.onnx` beside it: the fp32 graph with its MatMul weights dynamically quantized.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rankserve.engines.base import EngineInfo, EngineOutOfMemory
from rankserve.export.onnx import DATA_FILE, ONNX_FILE, canonical_dtype, export_onnx, read_onnx_metadata
from rankserve.model.checkpoint import Checkpoint

if TYPE_CHECKING:  # onnxruntime is imported when an engine is built: the options are usable without it
    import onnxruntime as ort

log = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
OPTIMIZED_SUFFIX = ".ort-optimized.onnx"
# Measured with scripts/bench_backends.py --budgets (docs/benchmarks.md): like the torch engine, tokens/s on
# CPU peaks at 1-2 k padded tokens per batch. The graph's attention is unfused ([B, H, S, S] scores), so larger
# batches also cost memory quadratic in the length.
CPU_BATCH_TOKENS = 2048


def auto_choice(ckpt: Checkpoint, dtype: str, max_length: int | None) -> tuple[bool, str]:
    """Whether `--backend auto` on a CPU runs onnxruntime, and why (logged). Decided by measurement
    (scripts/bench_backends.py, docs/benchmarks.md): on the full-size model, onnxruntime fp32 is no faster than
    torch (1.0x); it wins (1.9-2.4x) only on small checkpoints, where its lower per-op overhead shows. Being no
    faster, it is not worth its costs: an export at first start, a second copy of the weights on disk, and unfused
    attention (2 x heads x S^2 fp32 per sequence: 16 GiB for one 8192-token pair of the real model)."""
    return False, "torch (on the full-size model onnxruntime fp32 measured no faster; docs/benchmarks.md)"


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """What the settings say about the onnxruntime backend (docs/onnx.md)."""

    cache_dir: str | None = None  # None: `<checkpoint>/onnx`
    int8: bool = False  # dynamic int8 quantization of the MatMul weights (accuracy cost in docs/onnx.md)
    save_optimized: bool = False  # keep ORT's optimized graph beside the export and load it on later starts
    threads: int | None = None  # intra-op threads; None: one per CPU


def graph_dir(ckpt: Checkpoint, dtype: str, cache_dir: str | Path | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir else ckpt.path / "onnx"
    return root / f"{ckpt.fingerprint}-{canonical_dtype(dtype)}"


def _current(path: Path, ckpt: Checkpoint, dtype: str) -> bool:
    from rankserve.ranker import PROMPT_TEMPLATE_VERSION

    if not path.is_file():
        return False
    try:
        meta = read_onnx_metadata(path)
    except Exception as e:  # a truncated or foreign file: export again
        log.warning("ignoring %s: unreadable (%s)", path, e)
        return False
    want = {"checkpoint_fingerprint": ckpt.fingerprint, "dtype": dtype, "template_version": PROMPT_TEMPLATE_VERSION}
    stale = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if stale:
        log.warning("ignoring %s: exported for another checkpoint or version (%s)", path, stale)
    return not stale


def ensure_graph(ckpt: Checkpoint, *, dtype: str = "float32", cache_dir: str | Path | None = None) -> Path:
    """The exported graph of `ckpt`, exported now if there is no current one in the cache."""
    dtype = canonical_dtype(dtype)
    folder = graph_dir(ckpt, dtype, cache_dir)
    path = folder / ONNX_FILE
    if _current(path, ckpt, dtype):
        log.info("using the ONNX graph %s", path)
        return path
    log.info("no ONNX graph for %s (%s) yet: exporting it to %s (once; later starts reuse it)", ckpt.path, dtype, path)
    try:
        return export_onnx(ckpt, folder, dtype=dtype, progress=False)
    except PermissionError as e:
        hint = "set onnx_cache_dir to a writable folder"
        raise RuntimeError(f"cannot write the ONNX graph to {folder} ({e}); {hint}") from e


def _newer(derived: Path, source: Path) -> bool:
    """Whether `derived` exists and was written after `source` (else it is made again from it)."""
    return derived.is_file() and derived.stat().st_mtime_ns >= source.stat().st_mtime_ns


def ensure_int8(fp32_graph: Path) -> Path:
    """`model.int8.onnx` beside the fp32 graph: dynamic (per-batch activation scale) int8 quantization of MatMuls."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = fp32_graph.with_name(INT8_FILE)
    if _newer(out, fp32_graph):
        return out
    log.info("quantizing %s to int8 (MatMul weights, per channel) -> %s", fp32_graph, out)
    tmp = Path(tempfile.mkdtemp(prefix=".int8-", dir=fp32_graph.parent))
    try:
        quantize_dynamic(
            fp32_graph,
            tmp / INT8_FILE,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            use_external_data_format=(fp32_graph.parent / DATA_FILE).exists(),
        )
        for f in sorted(tmp.iterdir(), key=lambda p: p.name != INT8_FILE + ".data"):  # data before the graph
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def session_options(threads: int | None, optimized_path: Path | None = None) -> ort.SessionOptions:
    import onnxruntime as ort

    so = ort.SessionOptions()
    # One engine thread calls run(); inter-op parallelism only helps graphs with parallel branches (ours is a chain).
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", optimized_path.name + ".data"
        )
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return so


class OnnxRuntimeEngine:
    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        precision: str,
        max_length: int,
        pad_token_id: int,
        graph: Path,
    ) -> None:
        self.session = session
        self.graph = graph
        inputs = [i.name for i in session.get_inputs()]
        if inputs != ["input_ids", "attention_mask"]:
            raise RuntimeError(f"{graph}: expected inputs input_ids, attention_mask; the graph has {inputs}")
        self.info = EngineInfo(
            backend="onnxruntime",
            device="cpu",
            precision=precision,
            max_length=max_length,
            pad_token_id=pad_token_id,
            preferred_batch_tokens=CPU_BATCH_TOKENS,
        )

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Checkpoint,
        *,
        dtype: str = "auto",
        max_length: int | None = None,
        options: OnnxRuntimeOptions | None = None,
    ) -> OnnxRuntimeEngine:
        import onnxruntime as ort

        opts = options or OnnxRuntimeOptions()
        dtype = "float32" if dtype == "auto" else canonical_dtype(dtype)
        if dtype != "float32":
            # ONNX Runtime's CPU kernels for fp16/bf16 MatMul are slow or missing: those exports are for TensorRT.
            raise ValueError(f"the onnxruntime backend runs float32 (optionally int8) graphs on CPU, not {dtype}")
        graph = ensure_graph(ckpt, dtype=dtype, cache_dir=opts.cache_dir)
        precision = "float32"
        if opts.int8:
            graph, precision = ensure_int8(graph), "int8"
        optimized = (
            graph.with_name(graph.name.removesuffix(".onnx") + OPTIMIZED_SUFFIX) if opts.save_optimized else None
        )
        if optimized is not None and _newer(optimized, graph):
            # Saved by an earlier start on this machine: load it as is, without optimizing again.
            log.info("loading the saved optimized graph %s", optimized)
            so = session_options(opts.threads)
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            session = ort.InferenceSession(str(optimized), so, providers=["CPUExecutionProvider"])
        else:
            session = ort.InferenceSession(
                str(graph), session_options(opts.threads, optimized), providers=["CPUExecutionProvider"]
            )
        limit = min(max_length or ckpt.config.max_length, ckpt.config.max_length)
        return cls(session, precision=precision, max_length=limit, pad_token_id=ckpt.config.pad_token_id, graph=graph)

    def score(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        lens = np.asarray(lengths, dtype=np.int64)
        mask = (np.arange(ids.shape[1], dtype=np.int64)[None, :] < lens[:, None]).astype(np.int64)
        try:
            (logits,) = self.session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
        except Exception as e:  # ORT raises a generic Fail for allocation failures
            if "bad_alloc" in str(e) or "Failed to allocate" in str(e):
                raise EngineOutOfMemory(f"cpu out of memory on a batch of {ids.shape}") from e
            raise
        return np.asarray(logits, dtype=np.float32)

    def warmup(self) -> None:
        for batch, seqlen in ((1, 8), (4, 64)):
            ids = np.full((batch, seqlen), self.info.pad_token_id, dtype=np.int64)
            self.score(ids, np.full(batch, seqlen, dtype=np.int64))

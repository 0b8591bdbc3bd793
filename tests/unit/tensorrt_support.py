"""ONNX graphs in the export's contract shape (inputs `input_ids`/`attention_mask` int64 [batch, sequence], output
`logits` float32 [batch], `rankserve.*` metadata), small enough to build in a test, and their numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def contract_onnx(
    directory: Path,
    *,
    dtype: str = "bfloat16",
    max_length: int = 8192,
    fingerprint: str = "0123456789abcdef",
    fp8: bool = False,
    input_names: tuple[str, str] = ("input_ids", "attention_mask"),
) -> Path:
    """logits[i] = scale · Σ_j ids[i, j] · (j + 1) · mask[i, j] / Σ_j mask[i, j]: depends on every real token, its
    position and the row's length, so a wrong shape, row order, mask or buffer shows in the result. `scale` (1.0)
    (the mean of 1024 ones) is stored as external data, as the real export stores its weights."""
    ids, mask = input_names
    nodes = [
        helper.make_node("CumSum", [mask, "axis1"], ["positions"]),
        helper.make_node("Mul", ["positions", mask], ["weights"]),
        helper.make_node("Mul", [ids, "weights"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted", "axes1"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", [mask, "axes1"], ["count"], keepdims=0),
        helper.make_node("Cast", ["total"], ["total_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["count"], ["count_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["total_f", "count_f"], ["mean"]),
        helper.make_node("ReduceMean", ["scale"], ["scale_mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "scale_mean"], ["logits"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array(1, dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes1"),
        numpy_helper.from_array(np.ones(1024, dtype=np.float32), "scale"),
    ]
    if fp8:  # what a ModelOpt FP8 export carries: an FP8 zero point for a Q/DQ pair
        initializers.append(helper.make_tensor("fp8_zero_point", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    graph = helper.make_graph(
        nodes,
        "contract",
        [
            helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch"])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {
        "rankserve.model_id": "nvidia/llama-nemotron-rerank-1b-v2",
        "rankserve.max_length": str(max_length),
        "rankserve.template_version": "1",
        "rankserve.dtype": dtype,
        "rankserve.checkpoint_fingerprint": fingerprint,
        "rankserve.opset": "17",
    }
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    return path


def reference_logits(input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    out = np.empty(len(lengths), dtype=np.float32)
    for row, length in enumerate(lengths):
        out[row] = (input_ids[row, :length] * np.arange(1, length + 1)).sum() / length
    return out


def random_batch(rng: np.random.Generator, batch: int, seq: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids (the longest row exactly `seq` long), as the scheduler hands them to an engine."""
    lengths = rng.integers(1, seq + 1, size=batch)
    lengths[rng.integers(batch)] = seq
    ids = np.full((batch, seq), pad, dtype=np.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(1, 1000, size=length)
    return ids, lengths.astype(np.int64)

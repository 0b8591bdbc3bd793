"""Real TensorRT on a real GPU: build from the ONNX export, parity with PyTorch, the start-up cache, refusals.

Runs wherever `tensorrt` imports and PyTorch sees a CUDA GPU (NVIDIA's TensorRT container: see the Dockerfile and
docs/tensorrt.md); skipped elsewhere with the reason. Uses the tiny generated checkpoint (seconds to build).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from rankserve.model.checkpoint import Checkpoint


def _why_not() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (run in NVIDIA's TensorRT container: docs/tensorrt.md)"
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to PyTorch"
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("rankserve.export.onnx") is None:
        return "the ONNX export needs `pip install 'rankserve[onnx]'`"
    return None


REASON = _why_not()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

# Small profiles: three buckets, so that a batch lands in each.
SERVER = {"max_batch_size": 8, "max_batch_tokens": 512, "max_seq_length": 256}
BATCHES = [(8, 64), (7, 128), (3, 256), (1, 1), (5, 200)]


def tolerance(reference: np.ndarray) -> np.ndarray:
    """bf16 end to end against fp32: docs/model.md's 0.02 near 0, growing with the logit."""
    return 0.02 + 0.02 * np.abs(reference)


def batch(rng: np.random.Generator, ckpt: Checkpoint, rows: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(1, seq + 1, size=rows)
    lengths[0] = seq
    ids = np.full((rows, seq), ckpt.config.pad_token_id, dtype=np.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(0, ckpt.config.vocab_size, size=length)
    return ids, lengths.astype(np.int64)


@pytest.fixture(scope="module")
def built(tiny_checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rankserve.export.onnx import export_onnx
    from rankserve.tensorrt.build import build_engine
    from rankserve.tensorrt.metadata import GpuInfo
    from rankserve.tensorrt.targets import target_from_mapping

    root = tmp_path_factory.mktemp("trt")
    onnx_path = export_onnx(tiny_checkpoint, root / "onnx", dtype="bfloat16", progress=False)
    build = {"precision": "bf16", "precisions": ["bf16"], "sequence_buckets": [64, 128], "workspace_gib": 2}
    target = target_from_mapping("gpu-test", {**SERVER, "build": build})
    build_engine(onnx_path, root / "engine", target, gpu=GpuInfo.current(), timing_cache=root / "timing.cache")
    return root / "engine"


def test_tensorrt_matches_pytorch_in_every_profile(built: Path, tiny_checkpoint: Checkpoint) -> None:
    from rankserve.engines.tensorrt_engine import TensorRTEngine
    from rankserve.engines.torch_engine import TorchEngine

    engine = TensorRTEngine.from_directory(built, tiny_checkpoint, device="cuda")
    assert [p.max for p in engine.profiles] == [(8, 64), (7, 128), (3, 256)]
    engine.warmup()
    reference = TorchEngine.from_checkpoint(tiny_checkpoint, device="cpu", dtype="float32")
    torch_bf16 = TorchEngine.from_checkpoint(tiny_checkpoint, device="cuda", dtype="bfloat16")
    rng = np.random.default_rng(0)
    for rows, seq in BATCHES:
        ids, lengths = batch(rng, tiny_checkpoint, rows, seq)
        expected = reference.score(ids, lengths)
        got = engine.score(ids, lengths)
        assert got.dtype == np.float32 and got.shape == (rows,)
        assert np.all(np.abs(got - expected) <= tolerance(expected)), (rows, seq, got, expected)
        assert np.all(np.abs(torch_bf16.score(ids, lengths) - expected) <= tolerance(expected))
        if rows > 2:
            assert np.std(expected) > 0.01  # the rows differ: the tolerance can tell a wrong row from a right one
    # The rows of a batch are independent of their neighbours (padding and row order do not leak).
    ids, lengths = batch(rng, tiny_checkpoint, 4, 100)
    one_by_one = np.array([engine.score(ids[i : i + 1, : lengths[i]], lengths[i : i + 1])[0] for i in range(4)])
    np.testing.assert_allclose(engine.score(ids, lengths), one_by_one, atol=0.02)
    handles = [s.cuda_stream for s in engine._streams if s is not None]
    assert len(set(handles)) == 3 and 0 not in handles  # one non-default stream per profile


def test_refuses_an_engine_for_another_tensorrt_or_checkpoint(
    built: Path, tiny_checkpoint: Checkpoint, tmp_path: Path
) -> None:
    import shutil

    from rankserve.engines.tensorrt_engine import TensorRTEngine
    from rankserve.tensorrt.metadata import EngineIncompatible, read_metadata, write_metadata

    copy = tmp_path / "engine"
    shutil.copytree(built, copy)
    meta = read_metadata(copy)
    write_metadata(copy, dataclasses.replace(meta, tensorrt_version="9.0.0"))
    with pytest.raises(EngineIncompatible, match=r"built with TensorRT 9\.0\.0"):
        TensorRTEngine.from_directory(copy, tiny_checkpoint, device="cuda")
    write_metadata(copy, dataclasses.replace(meta, checkpoint_fingerprint="0" * 16))
    with pytest.raises(EngineIncompatible, match="built from checkpoint 0000"):
        TensorRTEngine.from_directory(copy, tiny_checkpoint, device="cuda")
    write_metadata(copy, meta)
    (copy / "model.plan").write_bytes(b"not a plan")
    with pytest.raises(EngineIncompatible, match="could not deserialize"):
        TensorRTEngine.from_directory(copy, tiny_checkpoint, device="cuda")


def test_auto_builds_once_then_loads_from_the_cache(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    from rankserve.engines import create_engine
    from rankserve.engines.tensorrt_engine import TensorRTEngine
    from rankserve.tensorrt.auto import TensorRTOptions

    options = TensorRTOptions(cache_dir=str(tmp_path / "cache"), **SERVER)
    first = create_engine(tiny_checkpoint, backend="auto", device="cuda", dtype="auto", max_length=None,
                          tensorrt=options)  # fmt: skip
    assert isinstance(first, TensorRTEngine)
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    plan_time = (entry / "model.plan").stat().st_mtime_ns
    second = create_engine(tiny_checkpoint, backend="auto", device="cuda", dtype="auto", max_length=None,
                           tensorrt=options)  # fmt: skip
    assert isinstance(second, TensorRTEngine)
    assert (entry / "model.plan").stat().st_mtime_ns == plan_time  # loaded, not rebuilt
    ids, lengths = batch(np.random.default_rng(1), tiny_checkpoint, 4, 64)
    np.testing.assert_allclose(first.score(ids, lengths), second.score(ids, lengths), atol=1e-3)

"""The TensorRT engine over the fake TensorRT (CPU buffers): profile choice, shapes, addresses and results, the
limits the scheduler learns, and refusing engines built for something else."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from rankserve.engines.tensorrt_engine import TensorRTEngine
from rankserve.model.checkpoint import Checkpoint
from rankserve.runtime import batch_policy
from rankserve.scheduler import Scheduler
from rankserve.settings import Settings
from rankserve.tensorrt.build import build_engine
from rankserve.tensorrt.metadata import EngineIncompatible, GpuInfo, read_metadata, write_metadata
from tests.unit import fake_tensorrt
from tests.unit.tensorrt_support import contract_onnx, random_batch, reference_logits
from tests.unit.test_tensorrt_build import H100, small_target


@pytest.fixture
def engine_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_checkpoint: Checkpoint) -> Path:
    fake_tensorrt.install(monkeypatch)
    onnx_path = contract_onnx(tmp_path / "onnx", fingerprint=tiny_checkpoint.fingerprint)
    build_engine(onnx_path, tmp_path / "engine", small_target(), gpu=H100, progress=None)
    return tmp_path / "engine"


def load(engine_dir: Path, ckpt: Checkpoint, gpu: GpuInfo = H100, **kwargs: object) -> TensorRTEngine:
    return TensorRTEngine.from_directory(engine_dir, ckpt, device="cpu", gpu=gpu, **kwargs)  # type: ignore[arg-type]


def test_one_context_per_profile_and_the_limits_it_publishes(engine_dir: Path, tiny_checkpoint: Checkpoint) -> None:
    engine = load(engine_dir, tiny_checkpoint)
    assert [p.max for p in engine.profiles] == [(8, 64), (7, 128), (3, 256)]
    assert len(engine._contexts) == 3
    assert [c.profile for c in engine._contexts] == [0, 1, 2]
    info = engine.info
    assert (info.backend, info.precision, info.max_length) == ("tensorrt", "bfloat16", 256)
    assert info.pad_token_id == tiny_checkpoint.config.pad_token_id
    assert info.max_batch_size == 8 and info.max_batch_tokens >= 512 and info.preferred_batch_tokens == 512
    assert load(engine_dir, tiny_checkpoint, max_length=100).info.max_length == 100


def test_each_batch_runs_on_the_smallest_covering_profile(engine_dir: Path, tiny_checkpoint: Checkpoint) -> None:
    engine = load(engine_dir, tiny_checkpoint)
    rng = np.random.default_rng(0)
    for (rows, seq), profile in [((8, 64), 0), ((1, 1), 0), ((5, 65), 1), ((7, 128), 1), ((3, 256), 2), ((1, 200), 2)]:
        ids, lengths = random_batch(rng, rows, seq)
        np.testing.assert_allclose(engine.score(ids, lengths), reference_logits(ids, lengths), rtol=1e-6)
        assert engine._contexts[profile].runs[-1][:2] == (profile, (rows, seq))


def test_a_batch_beyond_every_profile_is_split(engine_dir: Path, tiny_checkpoint: Checkpoint) -> None:
    engine = load(engine_dir, tiny_checkpoint)
    ids, lengths = random_batch(np.random.default_rng(1), 7, 250)  # profile 2 takes 3 rows of 250
    np.testing.assert_allclose(engine.score(ids, lengths), reference_logits(ids, lengths), rtol=1e-6)
    assert [shape for _, shape, _ in engine._contexts[2].runs] == [(3, 250), (3, 250), (1, 250)]


def test_warmup_runs_every_profile(engine_dir: Path, tiny_checkpoint: Checkpoint) -> None:
    engine = load(engine_dir, tiny_checkpoint)
    engine.warmup()
    assert all(context.runs for context in engine._contexts)


def test_scheduler_batches_fit_the_profiles(engine_dir: Path, tiny_checkpoint: Checkpoint) -> None:
    """Settings asking for bigger batches than the engine takes are clamped, and under a mixed load no batch needs
    splitting: each engine call is one profile run."""
    engine = load(engine_dir, tiny_checkpoint)
    settings = Settings(model=str(engine_dir), max_batch_size=64, max_batch_tokens=100_000)
    policy = batch_policy(settings, engine)
    assert policy.max_batch_size == 8 and policy.max_batch_tokens == engine.info.max_batch_tokens
    calls: list[tuple[int, int]] = []
    score = engine.score

    def counting(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        calls.append(ids.shape)
        return score(ids, lengths)

    engine.score = counting  # type: ignore[method-assign]
    rng = np.random.default_rng(2)
    requests = [[rng.integers(1, 1000, size=int(n)) for n in rng.integers(1, 257, size=20)] for _ in range(6)]

    async def run() -> list[np.ndarray]:
        scheduler = Scheduler(engine, policy)
        scheduler.start()
        try:
            return await asyncio.gather(*(scheduler.submit(r) for r in requests))
        finally:
            await scheduler.close()

    results = asyncio.run(run())
    for request, logits in zip(requests, results, strict=True):
        lengths = np.array([len(s) for s in request])
        ids = np.zeros((len(request), lengths.max()), dtype=np.int64)
        for row, s in enumerate(request):
            ids[row, : len(s)] = s
        np.testing.assert_allclose(logits, reference_logits(ids, lengths), rtol=1e-6)
    runs = sum(len(c.runs) for c in engine._contexts)
    assert runs == len(calls) > 1  # one profile run per engine call: no batch was split


def test_refuses_another_tensorrt_version(engine_dir: Path, tiny_checkpoint: Checkpoint) -> None:
    fake_tensorrt.__version__ = "10.14.1.48"  # the fixture's monkeypatch restores it
    with pytest.raises(EngineIncompatible, match=r"built with TensorRT 10\.13\.0\.35, this is TensorRT 10\.14\.1\.48"):
        load(engine_dir, tiny_checkpoint)


def test_refuses_another_gpu_architecture(engine_dir: Path, tiny_checkpoint: Checkpoint) -> None:
    with pytest.raises(EngineIncompatible, match=r"built for NVIDIA H100.*9\.0.*NVIDIA L4 .*8\.9.*rebuild"):
        load(engine_dir, tiny_checkpoint, gpu=GpuInfo("NVIDIA L4", "8.9"))
    # Same architecture, another board: served (with a warning in the log).
    assert load(engine_dir, tiny_checkpoint, gpu=GpuInfo("NVIDIA H200", "9.0")).info.backend == "tensorrt"


def test_refuses_other_weights(engine_dir: Path, tiny_checkpoint: Checkpoint) -> None:
    meta = read_metadata(engine_dir)
    write_metadata(engine_dir, dataclasses.replace(meta, checkpoint_fingerprint="0000000000000000"))
    with pytest.raises(EngineIncompatible, match="built from checkpoint 0000000000000000"):
        load(engine_dir, tiny_checkpoint)


def test_plan_that_tensorrt_cannot_read(engine_dir: Path, tiny_checkpoint: Checkpoint) -> None:
    (engine_dir / "model.plan").write_bytes(b"\x00garbage")
    with pytest.raises(EngineIncompatible, match="could not deserialize"):
        load(engine_dir, tiny_checkpoint)


def test_missing_or_broken_metadata(engine_dir: Path, tiny_checkpoint: Checkpoint) -> None:
    (engine_dir / "engine.json").write_text('{"format": 99}')
    with pytest.raises(EngineIncompatible, match="not rankserve engine metadata: unknown metadata format"):
        load(engine_dir, tiny_checkpoint)
    (engine_dir / "model.plan").unlink()
    with pytest.raises(EngineIncompatible, match=r"holds no model\.plan.*rankserve build-engine"):
        load(engine_dir, tiny_checkpoint)


def test_a_cuda_device_is_required(engine_dir: Path, tiny_checkpoint: Checkpoint) -> None:
    with pytest.raises(RuntimeError, match="needs a CUDA device, not 'cpu'"):
        TensorRTEngine.from_directory(engine_dir, tiny_checkpoint, device="cpu")

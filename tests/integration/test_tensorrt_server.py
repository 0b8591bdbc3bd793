"""A real server over HTTP on the TensorRT engine path (the fake `tensorrt`, CPU buffers; the graph is the real ONNX
export of the tiny checkpoint): same rankings as the PyTorch server, batches within the engine's profiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rankserve.engines.base import Engine
from rankserve.model.checkpoint import Checkpoint
from rankserve.settings import Settings
from tests.integration._support import ServerThread, running, tiny_settings
from tests.unit import fake_tensorrt
from tests.unit.test_tensorrt_build import H100

WORDS = ("protein", "women", "grams", "day", "chart", "marathon", "summit", "leaders", "calorie", "health")


def passages(n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    return [{"text": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 120))))} for _ in range(n)]


def test_tensorrt_server_matches_the_pytorch_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_checkpoint: Checkpoint, tiny_checkpoint_dir: Path
) -> None:
    pytest.importorskip("rankserve.export.onnx", reason="the ONNX exporter (rankserve.export.onnx) is not here")
    from rankserve.engines.tensorrt_engine import TensorRTEngine
    from rankserve.export.onnx import export_onnx
    from rankserve.tensorrt.build import build_engine
    from rankserve.tensorrt.targets import target_from_mapping

    fake_tensorrt.install(monkeypatch)
    onnx_path = export_onnx(tiny_checkpoint, tmp_path / "onnx", dtype="float32", progress=False)
    build = {"precision": "fp32", "precisions": ["fp32"], "sequence_buckets": [64, 128], "workspace_gib": 1}
    target = target_from_mapping("test", {"max_batch_size": 8, "max_batch_tokens": 512, "max_seq_length": 256,
                                          "build": build})  # fmt: skip
    build_engine(onnx_path, tmp_path / "engine", target, gpu=H100, progress=None)

    def tensorrt_factory(ckpt: Checkpoint, settings: Settings) -> Engine:
        return TensorRTEngine.from_directory(tmp_path / "engine", ckpt, device="cpu", gpu=H100,
                                             max_length=settings.max_seq_length)  # fmt: skip

    # The settings ask for bigger batches than the profiles take: the scheduler must keep within the engine's.
    settings = tiny_settings(tiny_checkpoint_dir, max_seq_length=256, max_batch_size=64, max_batch_tokens=100_000)
    rng = np.random.default_rng(0)
    requests = [
        {"query": {"text": "how much protein should a female eat?"}, "passages": passages(40, rng), "truncate": "END"},
        {"query": {"text": "summit"}, "passages": passages(7, rng), "truncate": "END"},
    ]
    results = {}
    for name, factory in (("tensorrt", tensorrt_factory), ("torch", None)):
        with running(ServerThread(settings, engine_factory=factory, checkpoint=tiny_checkpoint)) as server:
            with server.client() as client:
                meta = client.get("/v1/metadata").json()
                results[name] = [client.post("/v1/ranking", json=r).json() for r in requests]
            if name == "tensorrt":
                assert meta["backend"] == "tensorrt" and meta["max_seq_length"] == 256
                assert meta["max_batch_tokens"] == server.engine.info.max_batch_tokens < 100_000
                policy = server.state.runtime.scheduler.policy
                assert policy.max_batch_size == 8
                runs = [run for context in server.engine._contexts for run in context.runs]
                assert runs and all((rows <= 8 and rows * seq <= policy.max_batch_tokens) or rows == 1
                                    for _, (rows, seq), _ in runs)  # fmt: skip
    for trt, torch in zip(results["tensorrt"], results["torch"], strict=True):
        assert [r["index"] for r in trt["rankings"]] == [r["index"] for r in torch["rankings"]]
        np.testing.assert_allclose([r["logit"] for r in trt["rankings"]], [r["logit"] for r in torch["rankings"]],
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
        assert trt["usage"] == torch["usage"]

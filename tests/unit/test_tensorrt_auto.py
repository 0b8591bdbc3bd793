"""Start-up on a GPU: cached engine → build once → PyTorch CUDA with the reason logged; `--backend tensorrt`."""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from rankserve.engines import create_engine
from rankserve.engines.tensorrt_engine import TensorRTEngine
from rankserve.model.checkpoint import Checkpoint
from rankserve.tensorrt import auto
from rankserve.tensorrt.auto import TensorRTOptions, build_lock, cache_key, decide, precision_for
from rankserve.tensorrt.build import build_engine
from rankserve.tensorrt.metadata import EngineIncompatible, GpuInfo, read_metadata, write_metadata
from tests.unit import fake_tensorrt
from tests.unit.tensorrt_support import contract_onnx, random_batch, reference_logits
from tests.unit.test_tensorrt_build import H100, small_target

VERSION = fake_tensorrt.__version__


def test_precision_follows_dtype_and_gpu() -> None:
    assert precision_for("auto", H100) == "bf16"
    assert precision_for("auto", GpuInfo("Tesla T4", "7.5")) == "fp16"
    assert precision_for("float16", H100) == "fp16"
    assert precision_for("float32", H100) == "fp32"


def test_cache_key_separates_what_a_plan_depends_on() -> None:
    target = small_target()
    base = dict(fingerprint="f" * 16, precision="bf16", gpu=H100, tensorrt_version=VERSION, target=target)
    keys = {
        cache_key(**base),  # type: ignore[arg-type]
        cache_key(**{**base, "precision": "fp16"}),  # type: ignore[arg-type]
        cache_key(**{**base, "gpu": GpuInfo("NVIDIA L40S", "8.9")}),  # type: ignore[arg-type]
        cache_key(**{**base, "tensorrt_version": "11.0.0"}),  # type: ignore[arg-type]
        cache_key(**{**base, "target": dataclasses.replace(target, max_batch_tokens=1024)}),  # type: ignore[arg-type]
    }
    assert len(keys) == 5
    assert cache_key(**base) == cache_key(**base)  # type: ignore[arg-type]
    assert all("/" not in k for k in keys)


def built(tmp_path: Path, fingerprint: str, name: str = "engine") -> Path:
    onnx_path = contract_onnx(tmp_path / f"{name}-onnx", fingerprint=fingerprint)
    build_engine(onnx_path, tmp_path / name, small_target(), gpu=H100, progress=None)
    return tmp_path / name


def test_decisions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_tensorrt.install(monkeypatch)
    fp = "a" * 16
    options = TensorRTOptions(cache_dir=str(tmp_path / "cache"))
    common = dict(tensorrt_version=VERSION, gpu=H100, fingerprint=fp, key="k", can_export=True)

    missing = "No module named 'tensorrt'"
    no_trt = decide(**{**common, "tensorrt_version": None}, tensorrt_error=missing, options=options)
    assert no_trt.action == "torch" and "TensorRT is not available (No module named 'tensorrt')" in no_trt.reason

    build = decide(**common, options=options)  # empty cache
    assert build.action == "build" and build.path == tmp_path / "cache" / "k"
    assert decide(**{**common, "can_export": False}, options=options).action == "torch"
    off = decide(**common, options=dataclasses.replace(options, build=False))
    assert off.action == "torch" and "building is off" in off.reason

    engine = built(tmp_path / "cache", fp, name="k")  # now cached under the key
    assert decide(**common, options=options) == auto.Decision("load", f"the cached engine {engine}", engine)
    stale = decide(**{**common, "tensorrt_version": "10.14.0"}, options=options)  # the cached plan is stale
    assert stale.action == "build"

    configured = dataclasses.replace(options, engine_dir=str(engine))
    assert decide(**common, options=configured).action == "load"
    elsewhere = decide(**{**common, "gpu": GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")}, options=configured)
    assert elsewhere.action == "torch" and "compute capability 9.0" in elsewhere.reason


def test_build_lock_admits_one_builder_at_a_time(tmp_path: Path) -> None:
    inside: list[int] = []
    overlap = []

    def worker(i: int) -> None:
        with build_lock(tmp_path / "k.lock"):
            inside.append(i)
            overlap.append(len(inside))
            time.sleep(0.02)
            inside.remove(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert overlap == [1, 1, 1, 1]


@pytest.fixture
def gpu_here(monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Checkpoint) -> list[str]:
    """A GPU machine with TensorRT as far as rankserve can tell: the fake TensorRT, an H100 reported, engines on
    CPU buffers, and an ONNX exporter that writes the contract graph (counting its calls)."""
    fake_tensorrt.install(monkeypatch)
    monkeypatch.setattr(auto, "current_gpu", lambda device: H100)
    loader = TensorRTEngine.from_directory.__func__  # type: ignore[attr-defined]

    def from_directory(cls: type, directory: Path, ckpt: Checkpoint, **kwargs: object) -> TensorRTEngine:
        return loader(cls, directory, ckpt, **{**kwargs, "device": "cpu", "gpu": H100})

    monkeypatch.setattr(TensorRTEngine, "from_directory", classmethod(from_directory))
    exports: list[str] = []

    def export_onnx(checkpoint: Checkpoint, output_dir: Path, *, dtype: str = "float32", **_: object) -> Path:
        exports.append(dtype)
        return contract_onnx(output_dir, dtype=dtype, fingerprint=checkpoint.fingerprint)

    monkeypatch.setitem(sys.modules, "rankserve.export.onnx", types.SimpleNamespace(export_onnx=export_onnx))
    monkeypatch.setattr(auto, "_can_export", lambda: True)
    return exports


def test_auto_builds_once_then_uses_the_cache(
    gpu_here: list[str], tmp_path: Path, tiny_checkpoint: Checkpoint, caplog: pytest.LogCaptureFixture
) -> None:
    options = TensorRTOptions(cache_dir=str(tmp_path / "cache"), max_batch_size=8, max_batch_tokens=512)
    make = lambda: create_engine(  # noqa: E731
        tiny_checkpoint, backend="auto", device="cuda", dtype="auto", max_length=None, tensorrt=options
    )
    with caplog.at_level(logging.INFO, logger="rankserve"):
        first = make()
    assert isinstance(first, TensorRTEngine) and gpu_here == ["bfloat16"]
    assert fake_tensorrt.Builder.builds == 1
    assert "no cached TensorRT engine for NVIDIA H100" in caplog.text
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    meta = read_metadata(entry)
    assert meta.checkpoint_fingerprint == tiny_checkpoint.fingerprint and meta.precision == "bf16"
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no work dirs left
    assert (tmp_path / "cache" / f"timing-sm90-trt{VERSION}.cache").is_file()

    second = make()
    assert isinstance(second, TensorRTEngine) and fake_tensorrt.Builder.builds == 1 and len(gpu_here) == 1
    ids, lengths = random_batch(__import__("numpy").random.default_rng(3), 4, 100)
    assert second.score(ids, lengths) == pytest.approx(reference_logits(ids, lengths), rel=1e-6)

    (entry / "engine.json").write_text("{}")  # a damaged entry is rebuilt in place
    with caplog.at_level(logging.WARNING, logger="rankserve"):
        third = make()
    assert isinstance(third, TensorRTEngine) and fake_tensorrt.Builder.builds == 2
    assert "ignoring the cached engine" in caplog.text and read_metadata(entry).precision == "bf16"


def test_auto_falls_back_to_pytorch_with_the_reason(
    gpu_here: list[str], tmp_path: Path, tiny_checkpoint: Checkpoint, caplog: pytest.LogCaptureFixture
) -> None:
    options = TensorRTOptions(cache_dir=str(tmp_path / "cache"), build=False)
    with caplog.at_level(logging.WARNING, logger="rankserve"):
        engine = auto.open_engine(
            tiny_checkpoint, device="cuda", dtype="auto", max_length=None, options=options, required=False
        )
    assert engine is None
    assert "using the PyTorch CUDA engine: no TensorRT engine for this GPU" in caplog.text
    with pytest.raises(EngineIncompatible, match="--backend tensorrt cannot start: no TensorRT engine"):
        auto.open_engine(tiny_checkpoint, device="cuda", dtype="auto", max_length=None, options=options, required=True)


def test_auto_falls_back_when_the_build_fails(
    gpu_here: list[str],
    tmp_path: Path,
    tiny_checkpoint: Checkpoint,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fake_tensorrt.Builder, "build_serialized_network", lambda self, network, config: None)
    options = TensorRTOptions(cache_dir=str(tmp_path / "cache"), max_batch_size=8, max_batch_tokens=512)
    with caplog.at_level(logging.WARNING, logger="rankserve"):
        assert auto.open_engine(tiny_checkpoint, device="cuda", dtype="auto", max_length=None, options=options,
                                required=False) is None  # fmt: skip
    assert "the TensorRT engine failed to build (TensorRT could not build the engine" in caplog.text
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # nothing half-built left behind


def test_backend_tensorrt_serves_a_configured_engine(
    gpu_here: list[str], tmp_path: Path, tiny_checkpoint: Checkpoint
) -> None:
    engine_dir = built(tmp_path, tiny_checkpoint.fingerprint)
    options = TensorRTOptions(engine_dir=str(engine_dir), cache_dir=str(tmp_path / "cache"))
    engine = create_engine(tiny_checkpoint, backend="tensorrt", device="cuda", dtype="auto", max_length=None,
                           tensorrt=options)  # fmt: skip
    assert engine.info.backend == "tensorrt" and fake_tensorrt.Builder.builds == 1  # the one built above
    meta = read_metadata(engine_dir)
    write_metadata(engine_dir, dataclasses.replace(meta, tensorrt_version="10.8.0"))
    with pytest.raises(EngineIncompatible, match=r"cannot serve here: the engine was built with TensorRT 10\.8\.0"):
        create_engine(tiny_checkpoint, backend="tensorrt", device="cuda", dtype="auto", max_length=None,
                      tensorrt=options)  # fmt: skip


def test_without_tensorrt_auto_logs_why(
    monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Checkpoint, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(auto, "current_gpu", lambda device: H100)
    with caplog.at_level(logging.WARNING, logger="rankserve"):
        engine = auto.open_engine(
            tiny_checkpoint, device="cuda", dtype="auto", max_length=None,
            options=TensorRTOptions(cache_dir=str(tmp_path)), required=False,
        )  # fmt: skip
    assert engine is None
    assert "using the PyTorch CUDA engine: TensorRT is not available (TensorRT is not installed" in caplog.text


def test_backend_tensorrt_without_a_gpu_says_so(
    monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Checkpoint, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    import torch

    fake_tensorrt.install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    options = TensorRTOptions(cache_dir=str(tmp_path))
    with pytest.raises(EngineIncompatible, match="cannot start: TensorRT needs an NVIDIA GPU and PyTorch sees none"):
        create_engine(tiny_checkpoint, backend="tensorrt", device="cuda", dtype="auto", max_length=None,
                      tensorrt=options)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="rankserve"):
        assert auto.open_engine(tiny_checkpoint, device="cuda", dtype="auto", max_length=None, options=options,
                                required=False) is None  # fmt: skip
    assert "not using TensorRT: TensorRT needs an NVIDIA GPU" in caplog.text

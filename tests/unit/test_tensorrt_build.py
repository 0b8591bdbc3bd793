"""The engine build against the fake TensorRT: what is parsed, configured and written, and the clear refusals."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from rankserve.tensorrt import TensorRTUnavailable, load_tensorrt
from rankserve.tensorrt.build import BuildError, build_engine, inspect_onnx, onnx_file
from rankserve.tensorrt.metadata import METADATA_FILE, PLAN_FILE, GpuInfo, read_metadata
from rankserve.tensorrt.targets import BuildTarget
from tests.unit import fake_tensorrt
from tests.unit.tensorrt_support import contract_onnx

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")


def small_target(**overrides: object) -> BuildTarget:
    values: dict = dict(
        name="test", precision="bf16", precisions=("bf16", "fp8"), max_batch_size=8, max_batch_tokens=512,
        max_seq_length=256, buckets=(64, 128), workspace_bytes=1 << 30, compute_capability="9.0",
    )  # fmt: skip
    return BuildTarget(**{**values, **overrides})


def test_missing_tensorrt_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(TensorRTUnavailable, match=r"TensorRT is not installed.*docs/tensorrt\.md"):
        load_tensorrt()


def test_too_old_tensorrt_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tensorrt.install(monkeypatch, version="8.6.1")
    with pytest.raises(TensorRTUnavailable, match=r"8\.6\.1 is too old"):
        load_tensorrt()


def test_inspect_reads_metadata_without_external_weights(tmp_path: Path) -> None:
    path = contract_onnx(tmp_path / "onnx", dtype="bfloat16", max_length=4096)
    assert (tmp_path / "onnx" / "model.onnx.data").is_file()
    info = inspect_onnx(onnx_file(tmp_path / "onnx"))
    assert info.path == path
    assert info.precision == "bf16"
    assert info.inputs == ("input_ids", "attention_mask") and info.outputs == ("logits",)
    assert info.metadata["rankserve.max_length"] == "4096"
    assert inspect_onnx(contract_onnx(tmp_path / "fp8", fp8=True)).precision == "fp8"
    with pytest.raises(BuildError, match="no ONNX model"):
        onnx_file(tmp_path / "nowhere")


def test_build_writes_plan_and_metadata(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_tensorrt.install(monkeypatch)
    onnx_path = contract_onnx(tmp_path / "onnx", dtype="bfloat16", fingerprint="feedfacecafebeef")
    progress = io.StringIO()
    target = small_target()
    meta = build_engine(
        onnx_path, tmp_path / "engine", target, gpu=H100, timing_cache=tmp_path / "t.cache", progress=progress
    )

    plan = json.loads((tmp_path / "engine" / PLAN_FILE).read_bytes())
    assert plan["onnx"] == str(onnx_path)
    expected = [[list(p.min), list(p.opt), list(p.max)] for p in target.profiles()]
    assert [p["input_ids"] for p in plan["profiles"]] == expected
    assert [p["attention_mask"] for p in plan["profiles"]] == expected
    assert read_metadata(tmp_path / "engine") == meta
    assert meta.tensorrt_version == fake_tensorrt.__version__
    assert (meta.gpu_name, meta.compute_capability, meta.precision) == (H100.name, "9.0", "bf16")
    assert meta.checkpoint_fingerprint == "feedfacecafebeef"  # from the export's metadata
    assert meta.profiles == tuple(target.profiles()) and meta.batch_tokens == 512
    assert len(meta.onnx_sha256) == 64
    out = progress.getvalue()
    assert "building a bf16 TensorRT" in out and "Building engine (3 steps)" in out and "Building engine done" in out
    assert "  Tactic selection" in out  # nested phases indented
    assert (tmp_path / "t.cache").is_file()


def test_timing_cache_is_reused_and_a_foreign_one_replaced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_tensorrt.install(monkeypatch)
    onnx_path = contract_onnx(tmp_path / "onnx")
    cache = tmp_path / "timing.cache"
    cache.write_text(json.dumps({"version": "9.9.9", "tactics": 99}))  # from another TensorRT
    build_engine(onnx_path, tmp_path / "e1", small_target(), gpu=H100, timing_cache=cache, progress=None)
    assert json.loads(cache.read_text()) == {"version": fake_tensorrt.__version__, "tactics": 3}


@pytest.mark.parametrize(
    ("graph", "asked", "message"),
    [
        ("float32", "bf16", "fp32 graph.*strongly typed.*--dtype bfloat16"),
        ("bfloat16", "fp8", "bf16 graph.*ModelOpt"),
    ],
)
def test_precision_comes_from_the_graph(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, graph: str, asked: str, message: str
) -> None:
    fake_tensorrt.install(monkeypatch)
    onnx_path = contract_onnx(tmp_path / "onnx", dtype=graph)
    with pytest.raises(BuildError, match=message):
        build_engine(onnx_path, tmp_path / "e", small_target(), gpu=H100, precision=asked, progress=None)
    assert not (tmp_path / "e" / PLAN_FILE).exists()


def test_refuses_a_graph_not_in_the_contract(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_tensorrt.install(monkeypatch)
    onnx_path = contract_onnx(tmp_path / "onnx", input_names=("ids", "mask"))
    with pytest.raises(BuildError, match="lacks input_ids, attention_mask"):
        build_engine(onnx_path, tmp_path / "e", small_target(), gpu=H100, progress=None)


def test_refuses_profiles_longer_than_the_export(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_tensorrt.install(monkeypatch)
    onnx_path = contract_onnx(tmp_path / "onnx", max_length=128)
    with pytest.raises(BuildError, match=r"reach 256 tokens.*at most 128"):
        build_engine(onnx_path, tmp_path / "e", small_target(), gpu=H100, progress=None)


def test_parser_errors_are_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_tensorrt.install(monkeypatch)
    onnx_path = contract_onnx(tmp_path / "onnx")
    (tmp_path / "onnx" / "model.onnx.data").unlink()  # external weights missing
    with pytest.raises(BuildError, match="ONNX parser rejected"):
        build_engine(onnx_path, tmp_path / "e", small_target(), gpu=H100, progress=None)
    assert not (tmp_path / "e" / METADATA_FILE).exists()


def test_an_fp8_quantized_graph_builds_an_fp8_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_tensorrt.install(monkeypatch)
    onnx_path = contract_onnx(tmp_path / "onnx", dtype="bfloat16", fp8=True)  # ModelOpt keeps the bf16 metadata
    meta = build_engine(onnx_path, tmp_path / "e", small_target(), gpu=H100, precision="fp8", progress=None)
    assert meta.precision == "fp8"
    with pytest.raises(BuildError, match=r"fp8 graph.*cannot give a bf16 engine"):
        build_engine(onnx_path, tmp_path / "e2", small_target(), gpu=H100, precision="bf16", progress=None)

"""The ONNX export (`rankserve export onnx`) and the onnxruntime engine, on the tiny checkpoint.

The fp32 graph is exported once per module, through the CLI, into the folder the engine's cache looks in.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from rankserve.cli import main  # noqa: E402
from rankserve.engines import create_engine  # noqa: E402
from rankserve.engines.onnxruntime_engine import (  # noqa: E402
    OnnxRuntimeEngine,
    OnnxRuntimeOptions,
    ensure_graph,
    ensure_int8,
    graph_dir,
)
from rankserve.engines.torch_engine import TorchEngine  # noqa: E402
from rankserve.export.onnx import export_onnx, read_onnx_metadata  # noqa: E402
from rankserve.model.checkpoint import Checkpoint  # noqa: E402
from rankserve.ranker import PROMPT_TEMPLATE_VERSION  # noqa: E402

PAD = 128001


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: Checkpoint, cache_dir: Path) -> Path:
    out = graph_dir(tiny_checkpoint, "float32", cache_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "onnx", "--model", str(tiny_checkpoint.path), "--output", str(out), "--quiet"])
    assert exit_info.value.code == 0
    return out / "model.onnx"


@pytest.fixture(scope="module")
def session(exported: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(exported), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def torch_engine(tiny_checkpoint: Checkpoint) -> TorchEngine:
    return TorchEngine.from_checkpoint(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ort_engine(tiny_checkpoint: Checkpoint, exported: Path, cache_dir: Path) -> OnnxRuntimeEngine:
    engine = create_engine(
        tiny_checkpoint,
        backend="onnxruntime",
        device="cpu",
        dtype="float32",
        max_length=None,
        onnxruntime=OnnxRuntimeOptions(cache_dir=str(cache_dir), threads=2),
    )
    assert isinstance(engine, OnnxRuntimeEngine)
    return engine


def padded(lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded random ids with BOS first, as the scheduler hands them to an engine."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), max(lengths)), PAD, dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, 0] = 128000
        ids[i, 1:n] = rng.integers(0, 128000, n - 1)
    return ids, np.array(lengths, dtype=np.int64)


def feeds(ids: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


# -- the file contract ----------------------------------------------------------------------------------------------


def test_graph_interface(exported: Path) -> None:
    model = onnx.load(str(exported))
    onnx.checker.check_model(str(exported))
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask"]
    for value in inputs.values():
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert dims(value) == ["batch", "sequence"]
    (output,) = model.graph.output
    assert output.name == "logits"
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(output) == ["batch"]
    # small graph: weights inside the one file
    assert not (exported.parent / "model.onnx.data").exists()


def test_metadata(exported: Path, tiny_checkpoint: Checkpoint) -> None:
    meta = read_onnx_metadata(exported)
    assert meta == {
        "model_id": "rankserve/random-tiny-seed0",
        "max_length": "8192",
        "template_version": PROMPT_TEMPLATE_VERSION,
        "dtype": "float32",
        "checkpoint_fingerprint": tiny_checkpoint.fingerprint,
        "opset": "20",
    }
    raw = {p.key for p in onnx.load(str(exported), load_external_data=False).metadata_props}
    assert {"rankserve.model_id", "rankserve.checkpoint_fingerprint", "rankserve.opset"} <= raw


def test_key_padding_mask_broadcasts(exported: Path) -> None:
    """The mask enters attention as a `[batch, 1, 1, sequence]` bias: no `[B, 1, S, S]` tensor anywhere."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(exported)))
    shapes = {v.name: dims(v) for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    assert all(s[-2:] != ["sequence", "sequence"] or s[1] != 1 for s in shapes.values() if len(s) == 4)
    biases = [n for n in model.graph.node if n.op_type == "Where"]
    assert biases, "the boolean key mask should become an additive bias"
    for node in biases:
        assert shapes[node.output[0]] == ["batch", 1, 1, "sequence"]
    adds = [
        n for n in model.graph.node if n.op_type == "Add" and any(i == b.output[0] for b in biases for i in n.input)
    ]
    assert adds, "the bias is added to the attention scores"
    ops = {n.op_type for n in model.graph.node}
    assert "IsNaN" not in ops  # no whole-scores NaN guard: every row has its BOS


# -- numerics: ORT vs the PyTorch engine -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lengths",
    [[1], [7], [3, 17, 1, 64, 5], [120, 2, 33, 33, 9, 81, 1, 47], [256, 255, 128, 3]],
)
def test_matches_torch_on_mixed_lengths(
    ort_engine: OnnxRuntimeEngine, torch_engine: TorchEngine, lengths: list[int]
) -> None:
    ids, lens = padded(lengths, seed=len(lengths))
    got, want = ort_engine.score(ids, lens), torch_engine.score(ids, lens)
    assert got.dtype == np.float32 and got.shape == (len(lengths),)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_padding_does_not_change_a_row(ort_engine: OnnxRuntimeEngine) -> None:
    ids, lens = padded([9, 40], seed=3)
    alone = ort_engine.score(ids[:1, :9], lens[:1])
    assert abs(float(alone[0]) - float(ort_engine.score(ids, lens)[0])) <= 1e-5


def test_engine_info(ort_engine: OnnxRuntimeEngine) -> None:
    info = ort_engine.info
    assert (info.backend, info.device, info.precision, info.max_length) == ("onnxruntime", "cpu", "float32", 8192)
    assert info.pad_token_id == PAD and info.preferred_batch_tokens > 0
    ort_engine.warmup()


def test_graph_runs_at_batch_1_seq_1(session: ort.InferenceSession, torch_engine: TorchEngine) -> None:
    ids, lens = padded([1])
    (logits,) = session.run(None, feeds(ids, lens))
    assert logits.shape == (1,) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, torch_engine.score(ids, lens), atol=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_graph_runs_at_batch_64_seq_2048(session: ort.InferenceSession, torch_engine: TorchEngine) -> None:
    """One run. The graph's attention is unfused: `[64, 4, 2048, 2048]` fp32 scores are 4 GiB, two live at once."""
    psutil = pytest.importorskip("psutil")
    if psutil.virtual_memory().available < 14 * 2**30:
        pytest.skip("needs about 10 GiB of free memory for the unfused attention scores at 64 × 2048")
    lengths = [2048, 1, *np.random.default_rng(5).integers(1, 2049, 62).tolist()]
    ids, lens = padded(lengths, seed=6)
    (logits,) = session.run(None, feeds(ids, lens))
    assert logits.shape == (64,) and logits.dtype == np.float32 and np.isfinite(logits).all()
    # a few rows against PyTorch, each alone (a whole torch batch of this shape would double the test's time)
    for row in (0, 1, 2):
        n = int(lens[row])
        want = torch_engine.score(ids[row : row + 1, :n], lens[row : row + 1])
        assert abs(float(logits[row]) - float(want[0])) <= 1e-4


# -- the cache: export on demand, reuse, stale files --------------------------------------------------------------


def test_cached_graph_is_reused(
    tiny_checkpoint: Checkpoint, exported: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = exported.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="rankserve.engines.onnxruntime_engine"):
        assert ensure_graph(tiny_checkpoint, cache_dir=cache_dir) == exported
    assert exported.stat().st_mtime_ns == before
    assert "using the ONNX graph" in caplog.text and "exporting" not in caplog.text


def test_stale_graph_is_not_used(tiny_checkpoint: Checkpoint, exported: Path, tmp_path: Path) -> None:
    from rankserve.engines.onnxruntime_engine import _current

    model = onnx.load(str(exported))
    for prop in model.metadata_props:
        if prop.key == "rankserve.checkpoint_fingerprint":
            prop.value = "0123456789abcdef"
    onnx.save(model, str(tmp_path / "model.onnx"))
    assert _current(exported, tiny_checkpoint, "float32")
    assert not _current(tmp_path / "model.onnx", tiny_checkpoint, "float32")
    (tmp_path / "broken.onnx").write_bytes(b"not a protobuf")
    assert not _current(tmp_path / "broken.onnx", tiny_checkpoint, "float32")


def test_export_on_demand_beside_the_checkpoint(
    tiny_checkpoint_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No cache dir: the engine exports into `<checkpoint>/onnx/<fingerprint>-float32/` and logs it."""
    from rankserve.model.checkpoint import open_checkpoint

    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint_dir, ckpt_dir, ignore=shutil.ignore_patterns("onnx"))
    ckpt = open_checkpoint(str(ckpt_dir))
    with caplog.at_level(logging.INFO, logger="rankserve.engines.onnxruntime_engine"):
        engine = OnnxRuntimeEngine.from_checkpoint(ckpt, options=OnnxRuntimeOptions(threads=1))
    assert engine.graph == ckpt_dir / "onnx" / f"{ckpt.fingerprint}-float32" / "model.onnx"
    assert "exporting it to" in caplog.text
    assert [p.name for p in engine.graph.parent.iterdir()] == ["model.onnx"]  # no temporary folder left behind


# -- int8, the optimized graph, refusals -----------------------------------------------------------------------------


def test_int8_quantizes_the_matmuls(
    tiny_checkpoint: Checkpoint, exported: Path, cache_dir: Path, torch_engine: TorchEngine
) -> None:
    path = ensure_int8(exported)
    assert path.name == "model.int8.onnx" and path.parent == exported.parent
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    options = OnnxRuntimeOptions(cache_dir=str(cache_dir), int8=True, threads=2)
    engine = OnnxRuntimeEngine.from_checkpoint(tiny_checkpoint, options=options)
    assert engine.info.precision == "int8"
    ids, lens = padded([3, 17, 64, 64, 30], seed=9)
    got, want = engine.score(ids, lens), torch_engine.score(ids, lens)
    assert np.isfinite(got).all()
    assert not np.allclose(got, want, atol=1e-6)  # quantized: not the fp32 numbers
    assert np.abs(got - want).max() < 0.1 * max(1.0, float(np.abs(want).max()))


def test_saved_optimized_graph_is_reused(tiny_checkpoint: Checkpoint, exported: Path, cache_dir: Path) -> None:
    options = OnnxRuntimeOptions(cache_dir=str(cache_dir), save_optimized=True, threads=1)
    first = OnnxRuntimeEngine.from_checkpoint(tiny_checkpoint, options=options)
    optimized = exported.with_name("model.ort-optimized.onnx")
    assert optimized.is_file()
    stamp = optimized.stat().st_mtime_ns
    second = OnnxRuntimeEngine.from_checkpoint(tiny_checkpoint, options=options)
    assert optimized.stat().st_mtime_ns == stamp
    ids, lens = padded([5, 12], seed=4)
    np.testing.assert_allclose(first.score(ids, lens), second.score(ids, lens), atol=1e-6)


def test_refusals(tiny_checkpoint: Checkpoint, cache_dir: Path) -> None:
    options = OnnxRuntimeOptions(cache_dir=str(cache_dir))
    with pytest.raises(ValueError, match="float32"):
        OnnxRuntimeEngine.from_checkpoint(tiny_checkpoint, dtype="bfloat16", options=options)
    with pytest.raises(ValueError, match="CPU"):
        create_engine(tiny_checkpoint, backend="onnxruntime", device="cuda", dtype="auto", max_length=None)


def test_cli_rejects_bad_options(tiny_checkpoint: Checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for extra in (["--int8", "--dtype", "bf16"], ["--opset", "12"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["export", "onnx", "--model", str(tiny_checkpoint.path), "--output", str(tmp_path), *extra])
        assert exit_info.value.code == 2
    assert "--int8" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


# -- half-precision exports (TensorRT's inputs) ----------------------------------------------------------------------


def test_bf16_export(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    path = export_onnx(tiny_checkpoint, tmp_path, dtype="bf16", progress=False)
    model = onnx.load(str(path))
    assert read_onnx_metadata(path)["dtype"] == "bfloat16"
    # every matrix (embedding, projections) is bf16; the score head is cast to fp32 by the model itself
    big = [t for t in model.graph.initializer if len(t.dims) == 2 and min(t.dims) > 1]
    assert len(big) == 1 + 7 * tiny_checkpoint.config.num_hidden_layers
    assert all(t.data_type == onnx.TensorProto.BFLOAT16 for t in big)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_large_graphs_keep_weights_in_an_external_file(
    tiny_checkpoint: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_engine: TorchEngine
) -> None:
    """The full model (2.5 GB in bf16) is over protobuf's 2 GB: its weights go to model.onnx.data. Forced here."""
    import rankserve.export.onnx as export_module

    monkeypatch.setattr(export_module, "EXTERNAL_DATA_BYTES", 0)
    path = export_onnx(tiny_checkpoint, tmp_path, progress=False)
    data = tmp_path / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > 30 * 2**20 > path.stat().st_size
    onnx.checker.check_model(str(path))
    assert read_onnx_metadata(path)["checkpoint_fingerprint"] == tiny_checkpoint.fingerprint
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, lens = padded([4, 19, 11], seed=8)
    (logits,) = session.run(None, feeds(ids, lens))
    np.testing.assert_allclose(logits, torch_engine.score(ids, lens), atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


# -- `--backend auto` on a CPU ---------------------------------------------------------------------------------------


def test_auto_on_cpu_is_torch_and_says_why(
    tiny_checkpoint: Checkpoint, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Measured on the full-size model, onnxruntime fp32 is no faster than torch: `auto` keeps torch on a CPU,
    for short and long limits alike, and logs the reason; `onnxruntime` must be asked for."""
    options = OnnxRuntimeOptions(cache_dir=str(cache_dir), threads=1)
    auto = {"backend": "auto", "device": "cpu", "dtype": "auto", "onnxruntime": options}
    with caplog.at_level(logging.INFO, logger="rankserve.engines"):
        assert create_engine(tiny_checkpoint, max_length=512, **auto).info.backend == "torch"
        assert create_engine(tiny_checkpoint, max_length=None, **auto).info.backend == "torch"
    assert "backend auto on the CPU: torch" in caplog.text and "benchmarks.md" in caplog.text

"""`rankserve build-engine` end to end over the fake TensorRT: from an ONNX export, and from a checkpoint through
the real ONNX exporter (then the engine's logits match the PyTorch engine's: the whole path but TensorRT's own
compilation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rankserve.cli import main
from rankserve.engines.tensorrt_engine import TensorRTEngine
from rankserve.model.checkpoint import Checkpoint
from rankserve.tensorrt import command
from rankserve.tensorrt.metadata import read_metadata
from tests.unit import fake_tensorrt
from tests.unit.tensorrt_support import contract_onnx, random_batch, reference_logits
from tests.unit.test_tensorrt_build import H100

SMALL_TARGET = """\
max_batch_size: 8
max_batch_tokens: 512
max_seq_length: 256
build:
  gpus: [H100]
  compute_capability: "9.0"
  precision: bf16
  precisions: [bf16, fp32]
  sequence_buckets: [64, 128]
  workspace_gib: 1
"""


@pytest.fixture
def cli_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    fake_tensorrt.install(monkeypatch)
    monkeypatch.setattr(command, "_gpu", lambda: H100)
    profile = tmp_path / "small.yaml"
    profile.write_text(SMALL_TARGET)
    return profile


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as e:
        main(["build-engine", *args])
    return int(e.value.code or 0)


def test_build_from_an_onnx_export(
    cli_gpu: Path, tmp_path: Path, tiny_checkpoint: Checkpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    contract_onnx(tmp_path / "onnx", fingerprint=tiny_checkpoint.fingerprint)
    out = tmp_path / "engine"
    assert run_cli("--onnx", str(tmp_path / "onnx"), "--profile", str(cli_gpu), "--output", str(out)) == 0
    captured = capsys.readouterr()
    assert f"wrote {out}/model.plan: TensorRT {fake_tensorrt.__version__}, NVIDIA H100" in captured.out
    assert "Building engine (3 steps)" in captured.err  # progress
    meta = read_metadata(out)
    assert (meta.target, meta.precision, meta.checkpoint_fingerprint) == ("small", "bf16", tiny_checkpoint.fingerprint)
    assert (out / "timing.cache").is_file()
    engine = TensorRTEngine.from_directory(out, tiny_checkpoint, device="cpu", gpu=H100)
    ids, lengths = random_batch(np.random.default_rng(4), 3, 200)
    np.testing.assert_allclose(engine.score(ids, lengths), reference_logits(ids, lengths), rtol=1e-6)


def test_precision_mismatch_and_fp8_from_a_checkpoint_are_refused(
    cli_gpu: Path, tmp_path: Path, tiny_checkpoint_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    contract_onnx(tmp_path / "onnx", dtype="float32")
    args = ["--profile", str(cli_gpu), "--output", str(tmp_path / "e")]
    assert run_cli("--onnx", str(tmp_path / "onnx"), "--precision", "bf16", *args) == 2
    assert "fp32 graph" in capsys.readouterr().err
    assert run_cli("--model", str(tiny_checkpoint_dir), "--precision", "fp8", *args) == 2
    assert "ModelOpt" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_build_from_a_checkpoint_matches_the_pytorch_engine(
    cli_gpu: Path, tmp_path: Path, tiny_checkpoint: Checkpoint, tiny_checkpoint_dir: Path
) -> None:
    pytest.importorskip("rankserve.export.onnx", reason="the ONNX exporter (rankserve.export.onnx) is not here")
    from rankserve.engines.torch_engine import TorchEngine

    out = tmp_path / "engine"
    args = ["--model", str(tiny_checkpoint_dir), "--precision", "fp32", "--profile", str(cli_gpu), "--output", str(out)]
    assert run_cli(*args, "--quiet") == 0
    assert not (out / "onnx").exists()  # the export is removed unless --keep-onnx
    meta = read_metadata(out)
    assert meta.precision == "fp32" and meta.checkpoint_fingerprint == tiny_checkpoint.fingerprint
    trt_engine = TensorRTEngine.from_directory(out, tiny_checkpoint, device="cpu", gpu=H100)
    torch_engine = TorchEngine.from_checkpoint(tiny_checkpoint, device="cpu", dtype="float32")
    rng = np.random.default_rng(5)
    pad = tiny_checkpoint.config.pad_token_id
    for rows, seq in [(8, 64), (7, 128), (3, 256)]:  # a batch in each profile
        ids, lengths = random_batch(rng, rows, seq, pad=pad)
        ids[ids != pad] %= tiny_checkpoint.config.vocab_size
        expected = torch_engine.score(ids, lengths)
        np.testing.assert_allclose(trt_engine.score(ids, lengths), expected, rtol=1e-4, atol=1e-4)
    assert [len(c.runs) for c in trt_engine._contexts] == [1, 1, 1]

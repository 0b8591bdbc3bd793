"""configs/<gpu>.yaml: each loads as a build target and as a `rankserve serve --config` preset; the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from rankserve.cli import _preset, main
from rankserve.settings import Settings
from rankserve.tensorrt.profiles import shape_limits
from rankserve.tensorrt.targets import TargetError, load_target, target_from_mapping

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# The GPU classes the NIM supports and the precisions each offers (the list).
EXPECTED = {
    "a100": ({"bf16", "fp16"}, "8.0", "A100"),
    "h100": ({"bf16", "fp8"}, "9.0", "H200"),
    "l40s": ({"fp16", "fp8"}, "8.9", "L40S"),
    "l4": ({"fp16", "fp8"}, "8.9", "L4"),
    "a10g": ({"fp16"}, "8.6", "A10G"),
}
DTYPE = {"bf16": "bfloat16", "fp16": "float16"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_gpu_config_is_a_build_target_and_a_server_preset(name: str) -> None:
    path = CONFIGS / f"{name}.yaml"
    target = load_target(path)
    precisions, capability, gpu = EXPECTED[name]
    assert set(target.precisions) == precisions and target.compute_capability == capability
    assert target.matches_gpu(f"NVIDIA {gpu} something")
    settings = Settings(**_preset(str(path)))
    assert settings.dtype == DTYPE[target.precision]  # the fallback engine runs in the engine's precision
    limits = shape_limits(target.profiles())
    # The server's batching (from the same file) fits the profiles planned from it.
    assert limits.max_length == settings.max_seq_length
    assert limits.max_batch_size == settings.max_batch_size
    assert settings.max_batch_tokens is not None and limits.max_batch_tokens >= settings.max_batch_tokens


def test_cpu_preset_still_loads_and_is_not_a_build_target() -> None:
    assert Settings(**_preset(str(CONFIGS / "cpu.yaml"))).backend == "torch"
    with pytest.raises(TargetError, match="no `build:` section"):
        load_target(CONFIGS / "cpu.yaml")


def test_bad_targets_are_named(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="unknown build keys precison"):
        target_from_mapping("x", {"build": {"precison": "bf16"}})
    with pytest.raises(TargetError, match="precision 'int3' is not one of"):
        target_from_mapping("x", {"build": {"precision": "int3"}})
    with pytest.raises(TargetError, match=r"fp8 is not among the target's precisions \['bf16'\]"):
        target_from_mapping("x", {"build": {"precision": "fp8", "precisions": ["bf16"]}})
    with pytest.raises(TargetError, match="x: max_batch_size"):
        target_from_mapping("x", {"max_batch_size": 0, "build": {}})
    (tmp_path / "t.yaml").write_text("build: [\n")
    with pytest.raises(TargetError, match="cannot read the build profile"):
        load_target(tmp_path / "t.yaml")


def test_build_engine_cli_reports_errors_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["build-engine", "--onnx", str(tmp_path), "--profile", str(CONFIGS / "cpu.yaml"), "--output", "x"])
    assert e.value.code == 2
    assert "no `build:` section" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["build-engine", "--profile", str(CONFIGS / "h100.yaml"), "--output", "x"])
    assert e.value.code == 2  # argparse: one of --model/--onnx is required
    assert "one of the arguments --model --onnx is required" in capsys.readouterr().err

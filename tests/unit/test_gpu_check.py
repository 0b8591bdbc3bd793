"""The GPU check's own arithmetic and report (the GPU numbers themselves come from scripts/gpu_check.sh)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import gpu_check
from rankserve.model.config import RerankerConfig
from rankserve.model.synthetic import REAL_CONFIG


def test_flops_per_pair_matches_the_spec() -> None:
    """performance.md: 2 × 973 M linear FLOPs per token plus 4·L·d·S² attention: ≈ 1.03 TFLOP at 512 tokens."""
    cfg = RerankerConfig.from_dict(REAL_CONFIG)
    at_512 = gpu_check.flops_per_pair(cfg, 512)
    assert at_512 == pytest.approx(1.03e12, rel=0.01)
    linear = gpu_check.flops_per_pair(cfg, 1) - 4 * 16 * 2048
    assert linear == pytest.approx(2 * 973e6, rel=0.001)


def test_arrival_batches_respect_budget_and_order() -> None:
    lengths = [[300, 20, 500], [100] * 5, [900]]
    batches = gpu_check._arrival_batches(lengths, budget=1000, max_batch=4)
    assert [n for b in batches for n in b] == [n for req in lengths for n in req]
    assert all(sum(b) <= 1000 and len(b) <= 4 for b in batches)
    assert batches[0] == [300, 20, 500, 100]
    assert gpu_check._arrival_batches([[2000]], budget=1000, max_batch=4) == [[2000]]  # too long alone: own batch


def test_spearman() -> None:
    a = np.array([0.1, 0.5, 0.3, 0.9])
    assert gpu_check.spearman(a, a * 3 + 1) == pytest.approx(1.0)
    assert gpu_check.spearman(a, -a) == pytest.approx(-1.0)


def test_report_lists_targets_errors_and_skips() -> None:
    results = {
        "environment": {"gpu": "NVIDIA H100 80GB HBM3", "matmul": {"tflops_median": 790.0}, "date_utc": "d"},
        "parity": {"packed (default)": {"ok": True}, "fp8": {"ok": False}, "tolerance": 0.03},
        "engine": {
            "budget_tokens": 16384,
            "hf eager": {"512": {"batch": 32, "pairs_s": 200.0, "tokens_s": 102400, "tflops": 206.0}},
            "rankserve packed": {"512": {"batch": 32, "pairs_s": 600.0, "tokens_s": 307200, "tflops": 618.0}},
        },
        "http": {"error": "RuntimeError: boom"},
        "graphs": {"skipped": "10s left"},
    }
    rows = {what: (result, target) for what, result, target in gpu_check.summary_rows(results)}
    assert rows["engine pairs/s @512"] == ("600.0 (MFU n/a, 3.00× eager)", "≥550 @512")
    assert "FAILED: fp8" in rows["parity vs CPU fp32 (tiny)"][0]
    assert rows["stage http"][0] == "RuntimeError: boom"
    assert rows["stage graphs"][0] == "skipped: 10s left"
    md = gpu_check.render_markdown(results, "scripts/gpu_check.sh out")
    assert "NVIDIA H100 80GB HBM3" in md and "| rankserve packed | 512 | 32 | 600.0 |" in md


def test_parse_args_dry_run_is_small() -> None:
    args = gpu_check.parse_args(["--output", "x", "--dry-run"])
    assert args.compile is False and args.budget_tokens == 512 and args.clients == [2]
    full = gpu_check.parse_args(["--output", "x"])
    assert full.compile is True and full.lengths == [128, 512, 2048] and full.clients == [8, 32]
    assert full.budget <= 420


# Packages the GPU machine's image has (/work/.library/device/KINDS.md, as read 2026-11-17), among those the
# wheels below need; anything else they need must be fetched by scripts/gpu_wheels.sh.
GPU_IMAGE_HAS = {
    "annotated-doc", "anyio", "click", "h11", "huggingface-hub", "httpx", "numpy", "prometheus-client", "pyyaml",
    "safetensors", "tokenizers", "torch", "transformers",
}  # fmt: skip


def test_gpu_wheels_cover_what_they_need() -> None:
    """Every runtime requirement of rankserve and of the fetched wheels (as installed in this .venv, the versions
    gpu_wheels.sh pins) is on the GPU image or fetched too: a missing one fails `import fastapi` there, after the
    machine's start has been paid for (fastapi 0.165 imports opentelemetry-api unconditionally)."""
    import importlib.metadata as md
    import re

    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    script = (Path(__file__).resolve().parents[2] / "scripts" / "gpu_wheels.sh").read_text(encoding="utf-8")
    fetched = {norm(n) for n in re.search(r"PACKAGES=\(([^)]*)\)", script).group(1).split()}
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "extra": ""}
    missing = []
    for dist in sorted(fetched | {"rankserve"}):
        for line in md.requires(dist) or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra, or another Python
            if norm(req.name) not in fetched | GPU_IMAGE_HAS:
                missing.append(f"{dist} needs {req}")
    assert not missing, missing

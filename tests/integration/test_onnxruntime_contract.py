"""The NIM contract tests of test_nim_contract.py, run again on `--backend onnxruntime`, plus the real CLI serving
an on-demand export.

The contract tests are the same functions (collected here a second time); only the server fixtures they ask for
are redefined below, with the onnxruntime backend. Every server shares one graph cache, so the tiny checkpoint is
exported once for this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from rankserve.model.checkpoint import Checkpoint
from tests.integration import test_nim_contract as contract
from tests.integration._cli import start_cli
from tests.integration._support import (
    MODEL_ID,
    Reference,
    ServerThread,
    assert_matches_reference,
    controlled_factory,
    ranking_body,
    running,
    tiny_settings,
)
from tests.integration.conftest import LIMITS

# Every contract test but the metadata one, which names the torch backend (the version below names ours).
globals().update({k: v for k, v in vars(contract).items() if k.startswith("test_") and k != "test_metadata"})


# The first test pays for the export (tens of seconds on a loaded 2-core machine): a module-wide bound, not 60 s.
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Checkpoint) -> Path:
    """The graph cache every server here shares, filled before the first server starts (its readiness wait is
    shorter than an export on a busy machine)."""
    from rankserve.engines.onnxruntime_engine import ensure_graph

    cache = tmp_path_factory.mktemp("onnx-cache")
    ensure_graph(tiny_checkpoint, cache_dir=cache)
    return cache


def ort_settings(checkpoint_dir: Path, cache: Path, **overrides: Any) -> Any:
    return tiny_settings(checkpoint_dir, backend="onnxruntime", onnx_cache_dir=str(cache), cpu_threads=1, **overrides)


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir: Path, onnx_cache: Path) -> Iterator[ServerThread]:
    with running(ServerThread(ort_settings(tiny_checkpoint_dir, onnx_cache), engine_factory=controlled_factory)) as s:
        yield s


@pytest.fixture(scope="module")
def limits_server(tiny_checkpoint_dir: Path, onnx_cache: Path) -> Iterator[ServerThread]:
    with running(ServerThread(ort_settings(tiny_checkpoint_dir, onnx_cache, **LIMITS))) as s:
        yield s


@pytest.fixture(scope="module")
def auth_server(tiny_checkpoint_dir: Path, tiny_checkpoint: Checkpoint, onnx_cache: Path) -> Iterator[ServerThread]:
    settings = ort_settings(tiny_checkpoint_dir, onnx_cache, api_key="s3cret-key")
    with running(ServerThread(settings, checkpoint=tiny_checkpoint)) as s:
        yield s


@pytest.fixture(scope="module")
def _controlled_server(
    tiny_checkpoint_dir: Path, tiny_checkpoint: Checkpoint, onnx_cache: Path
) -> Iterator[ServerThread]:
    settings = ort_settings(tiny_checkpoint_dir, onnx_cache, max_batch_size=2, warmup=False)
    with running(ServerThread(settings, engine_factory=controlled_factory, checkpoint=tiny_checkpoint)) as s:
        yield s


@pytest.mark.parametrize(("which", "max_seq", "max_passages"), [("server", 8192, 512), ("limits_server", 64, 4)])
def test_metadata_names_the_backend(
    request: pytest.FixtureRequest, which: str, max_seq: int, max_passages: int
) -> None:
    s: ServerThread = request.getfixturevalue(which)
    with s.client() as client:
        meta = client.get("/v1/metadata").json()
    assert MODEL_ID in (meta["id"], *meta.get("aliases", []))
    assert (meta["backend"], meta["device"], meta["precision"]) == ("onnxruntime", "cpu", "float32")
    assert meta["max_seq_length"] == max_seq
    assert meta["max_passages"] == max_passages
    assert s.engine.info.backend == "onnxruntime"
    ((labels, _),) = s.metrics()["rankserve_engine_info"]
    assert (labels["backend"], labels["precision"]) == ("onnxruntime", "float32")


def test_one_export_serves_every_server(server: ServerThread, limits_server: ServerThread, onnx_cache: Path) -> None:
    graphs = sorted(p.relative_to(onnx_cache) for p in onnx_cache.rglob("*.onnx"))
    assert len(graphs) == 1 and graphs[0].name == "model.onnx", graphs


@pytest.mark.timeout(240)
def test_cli_serves_onnxruntime_with_an_export_on_demand(
    tiny_checkpoint_dir: Path, tmp_path: Path, reference: Reference
) -> None:
    """`rankserve serve --backend onnxruntime` on a checkpoint without a graph: it exports (logging it) and serves
    the PyTorch model's logits; a second start reuses the graph."""
    cache = tmp_path / "cache"
    flags = ("--backend", "onnxruntime", "--onnx-cache-dir", str(cache), "--log-level", "info", "--log-format", "text")
    query, passages = "where is the harbor?", ["The harbor is north of the village.", "ok", "Prices rose. " * 30]
    for start in ("first", "second"):
        cli = start_cli(tiny_checkpoint_dir, tmp_path, *flags, ready_timeout=180)
        try:
            with cli.client() as client:
                r = client.post("/v1/ranking", json=ranking_body(query, passages))
                meta = client.get("/v1/metadata").json()
        finally:
            assert cli.stop() == 0
        assert r.status_code == 200, r.text
        assert_matches_reference(r.json(), reference.logits(query, passages))
        assert meta["backend"] == "onnxruntime"
        log = cli.log()
        if start == "first":
            assert "exporting it to" in log, log
        else:
            assert "using the ONNX graph" in log and "exporting it to" not in log, log
    assert len(list(cache.rglob("model.onnx"))) == 1

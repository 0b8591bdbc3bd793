"""Real uvicorn servers on free loopback ports, one per settings profile, each serving the tiny checkpoint.

Servers start lazily (only when a test asks for one) and live for the session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rankserve.model.checkpoint import Checkpoint
from tests.integration._support import (
    ControlledEngine,
    Reference,
    ServerThread,
    controlled_factory,
    running,
    tiny_settings,
)

LIMITS = {
    "max_passages": 4,
    "max_body_bytes": 4096,
    "max_seq_length": 64,
    "served_model_name": ["my-reranker"],
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test here talks to a real server: bound each one, whatever hangs.
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(60))


@pytest.fixture(scope="session")
def reference(tiny_checkpoint_dir: Path, tiny_model_fp32) -> Reference:
    return Reference(tiny_checkpoint_dir, tiny_model_fp32)


@pytest.fixture(scope="session")
def server(tiny_checkpoint_dir: Path) -> Iterator[ServerThread]:
    """Default settings. Its engine is the real one behind a pass-through recorder (to see the batches)."""
    settings = tiny_settings(tiny_checkpoint_dir)
    with running(ServerThread(settings, engine_factory=controlled_factory)) as s:
        yield s


@pytest.fixture(scope="session")
def limits_server(tiny_checkpoint_dir: Path) -> Iterator[ServerThread]:
    """Small limits (4 passages, 4 KiB bodies, 64 tokens) and an extra served model name; the default factory."""
    with running(ServerThread(tiny_settings(tiny_checkpoint_dir, **LIMITS))) as s:
        yield s


@pytest.fixture(scope="session")
def auth_server(tiny_checkpoint_dir: Path, tiny_checkpoint: Checkpoint) -> Iterator[ServerThread]:
    settings = tiny_settings(tiny_checkpoint_dir, api_key="s3cret-key")
    with running(ServerThread(settings, checkpoint=tiny_checkpoint)) as s:
        yield s


@pytest.fixture(scope="session")
def _controlled_server(tiny_checkpoint_dir: Path, tiny_checkpoint: Checkpoint) -> Iterator[ServerThread]:
    # Small batches, so a slow engine makes a request span several batches.
    settings = tiny_settings(tiny_checkpoint_dir, max_batch_size=2, warmup=False)
    with running(ServerThread(settings, engine_factory=controlled_factory, checkpoint=tiny_checkpoint)) as s:
        yield s


@pytest.fixture
def controlled_server(_controlled_server: ServerThread) -> Iterator[ServerThread]:
    """A server whose engine a test can slow down, break or make return NaN; reset after each test."""
    engine: ControlledEngine = _controlled_server.engine
    engine.reset()
    try:
        yield _controlled_server
    finally:
        engine.reset()

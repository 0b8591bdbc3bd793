"""Shared fixtures: generated checkpoints (the real on-disk format, random weights) built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from rankserve.model.checkpoint import Checkpoint, open_checkpoint
from rankserve.model.synthetic import write_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoint_dir: Path) -> Checkpoint:
    return open_checkpoint(str(tiny_checkpoint_dir))

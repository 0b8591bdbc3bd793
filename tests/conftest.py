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


# --- Model-core fixtures (tests/unit): the tiny checkpoint's model, tokenizer encoder and reference. ---


@pytest.fixture(scope="session")
def tiny_model_fp32(tiny_checkpoint: Checkpoint):
    """rankserve's model on the tiny checkpoint, fp32 on CPU (read-only: do not modify it)."""
    import torch

    from rankserve.model.checkpoint import load_model

    return load_model(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_checkpoint: Checkpoint):
    """A PairEncoder on the tiny checkpoint's tokenizer.json, max_length 8192."""
    from rankserve.ranker import PairEncoder

    cfg = tiny_checkpoint.config
    return PairEncoder.from_file(tiny_checkpoint.tokenizer_file, cfg.bos_token_id, cfg.max_length)


@pytest.fixture(scope="session")
def tiny_reference(tiny_checkpoint_dir: Path):
    """The independent transformers-based reference (tests/unit/reference.py) on the tiny checkpoint."""
    from tests.unit.reference import Reference

    return Reference(tiny_checkpoint_dir)

"""Packing and the packed forward: on CPU, the fast path must give the padded reference's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankserve.engines.packing import pack, pad_packed, pick_bucket, slots_for, token_buckets
from rankserve.model.llama import Reranker, padded_attention
from tests.unit.reference import max_abs_diff, right_pad

PAD = 128001


def _random_batch(rng: np.random.Generator, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    width = max(lengths)
    ids = np.full((len(lengths), width), PAD, dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(0, 128000, n)
    return ids, np.asarray(lengths, dtype=np.int64)


def test_pack_drops_padding_and_keeps_order() -> None:
    ids, lengths = _random_batch(np.random.default_rng(1), [3, 1, 5])
    p = pack(ids, lengths)
    assert p.tokens == 9 and p.n_seqs == 3 and p.n_real == 3 and p.max_seqlen == 5
    assert p.input_ids.tolist() == ids[0, :3].tolist() + ids[1, :1].tolist() + ids[2, :5].tolist()
    assert p.positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4]
    assert p.seq_ids.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2]
    assert p.cu_seqlens.tolist() == [0, 3, 4, 9]
    buf = p.host_buffer()
    assert buf.dtype == np.int64 and buf.shape == (3 * 9 + 4,)


@pytest.mark.parametrize("lengths", [[0, 2], [3, 9]])
def test_pack_rejects_bad_lengths(lengths: list[int]) -> None:
    with pytest.raises(ValueError, match="lengths"):
        pack(np.zeros((2, 4), dtype=np.int64), np.asarray(lengths))


def test_pad_packed_fills_tokens_and_slots_exactly() -> None:
    ids, lengths = _random_batch(np.random.default_rng(2), [7, 2, 4])
    p = pad_packed(pack(ids, lengths), tokens=32, slots=8, max_seqlen=8, pad_token_id=PAD)
    assert p.tokens == 32 and p.n_seqs == 8 and p.n_real == 3
    seq_lengths = np.diff(p.cu_seqlens).tolist()
    assert seq_lengths[:3] == [7, 2, 4]  # the real sequences keep their places
    assert seq_lengths[3:] == [8, 8, 3, 0, 0]  # 19 spare tokens as fillers of <= 8, then empty slots
    assert (p.input_ids[13:] == PAD).all()
    assert p.positions[13:21].tolist() == list(range(8))
    assert np.bincount(p.seq_ids, minlength=8).tolist() == seq_lengths


def test_pad_packed_refuses_what_does_not_fit() -> None:
    ids, lengths = _random_batch(np.random.default_rng(3), [6, 6])
    p = pack(ids, lengths)
    with pytest.raises(ValueError, match="exceeds"):
        pad_packed(p, tokens=8, slots=8, max_seqlen=8, pad_token_id=PAD)
    with pytest.raises(ValueError, match="exceeds"):
        pad_packed(p, tokens=16, slots=8, max_seqlen=4, pad_token_id=PAD)
    with pytest.raises(ValueError, match="slots"):
        pad_packed(p, tokens=64, slots=4, max_seqlen=8, pad_token_id=PAD)


def test_buckets() -> None:
    buckets = token_buckets(1024, 256)
    assert buckets == [256, 512, 768, 1024]
    assert pick_bucket(buckets, 1) == 256
    assert pick_bucket(buckets, 513) == 768
    assert pick_bucket(buckets, 1025) is None
    assert token_buckets(100, 256) == []
    # Any pack of <= max_batch sequences and <= bucket tokens fits its slots.
    rng = np.random.default_rng(4)
    for _ in range(50):
        bucket, max_seqlen, max_batch = int(rng.choice(buckets)), int(rng.integers(1, 300)), 8
        n = int(rng.integers(1, max_batch + 1))
        lens = rng.integers(1, max_seqlen + 1, n)
        if lens.sum() > bucket:
            continue
        ids, lengths = _random_batch(rng, lens.tolist())
        padded = pad_packed(pack(ids, lengths), bucket, slots_for(bucket, max_batch, max_seqlen), max_seqlen, PAD)
        assert padded.tokens == bucket


# -- the model's packed path against its padded reference -----------------------------------------------------


def _packed_logits(model: Reranker, ids: np.ndarray, lengths: np.ndarray, **pad_to: int) -> torch.Tensor:
    p = pack(ids, lengths)
    if pad_to:
        p = pad_packed(p, pad_token_id=PAD, **pad_to)
    t = {k: torch.from_numpy(getattr(p, k)) for k in ("input_ids", "positions", "seq_ids", "cu_seqlens")}
    attend = padded_attention(t["seq_ids"], t["positions"], t["cu_seqlens"].diff(), max(p.max_seqlen, 1), gqa=False)
    with torch.inference_mode():
        return model.forward_packed(t["input_ids"], t["positions"], t["seq_ids"], t["cu_seqlens"], attend)[: p.n_real]


@pytest.fixture(scope="module")
def fast_model(tiny_checkpoint) -> Reranker:
    from rankserve.model.checkpoint import load_model

    model = load_model(tiny_checkpoint, dtype=torch.float32)
    model.prepare_fast_path()
    return model


@pytest.mark.parametrize("lengths", [[5], [17, 17, 17], [1, 40, 3, 22, 9], [64, 2]])
def test_packed_forward_matches_padded(fast_model: Reranker, tiny_model_fp32: Reranker, lengths: list[int]) -> None:
    ids, lens = _random_batch(np.random.default_rng(sum(lengths)), lengths)
    with torch.inference_mode():
        reference = tiny_model_fp32(torch.from_numpy(ids), torch.from_numpy(lens))
    got = _packed_logits(fast_model, ids, lens)
    assert got.shape == reference.shape
    assert max_abs_diff(got, reference) < 1e-4, (got, reference)


def test_fused_model_forward_is_unchanged(fast_model: Reranker, tiny_model_fp32: Reranker) -> None:
    """Fusing makes the unfused weights views of the fused ones: `forward` (the ONNX export) gives the same."""
    ids, lens = right_pad([[128000, 5, 6, 7], [128000, 9]])
    with torch.inference_mode():
        assert torch.equal(fast_model(ids, lens), tiny_model_fp32(ids, lens))
    attn = fast_model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.k_proj.weight.untyped_storage().data_ptr()
    assert set(dict(fast_model.state_dict())) == set(dict(tiny_model_fp32.state_dict()))


def test_packed_forward_with_graph_padding_matches(fast_model: Reranker, tiny_model_fp32: Reranker) -> None:
    """The fixed shapes of a CUDA graph (filler and empty sequences) leave the real logits unchanged."""
    ids, lens = _random_batch(np.random.default_rng(7), [30, 4, 12])
    with torch.inference_mode():
        reference = tiny_model_fp32(torch.from_numpy(ids), torch.from_numpy(lens))
    got = _packed_logits(fast_model, ids, lens, tokens=128, slots=slots_for(128, 4, 32), max_seqlen=32)
    assert max_abs_diff(got, reference) < 1e-4


@pytest.mark.parametrize("pooling", ["cls", "last"])
def test_packed_pooling_variants(tiny_checkpoint, pooling: str) -> None:
    from dataclasses import replace

    from rankserve.model.checkpoint import load_model

    model = load_model(tiny_checkpoint, dtype=torch.float32)
    model.config = replace(model.config, pooling=pooling)
    ids, lens = _random_batch(np.random.default_rng(8), [9, 3, 14])
    with torch.inference_mode():
        reference = model(torch.from_numpy(ids), torch.from_numpy(lens))
    assert max_abs_diff(_packed_logits(model, ids, lens), reference) < 1e-4


def test_gqa_sdpa_matches_repeated_heads(fast_model: Reranker, tiny_model_fp32: Reranker) -> None:
    ids, lens = _random_batch(np.random.default_rng(9), [11, 25])
    p = pack(ids, lens)
    t = {k: torch.from_numpy(getattr(p, k)) for k in ("input_ids", "positions", "seq_ids", "cu_seqlens")}
    with torch.inference_mode():
        reference = tiny_model_fp32(torch.from_numpy(ids), torch.from_numpy(lens))
        attend = padded_attention(t["seq_ids"], t["positions"], t["cu_seqlens"].diff(), p.max_seqlen, gqa=True)
        got = fast_model.forward_packed(t["input_ids"], t["positions"], t["seq_ids"], t["cu_seqlens"], attend)
    assert max_abs_diff(got, reference) < 1e-4

"""Optimization-profile planning and selection: every batch the scheduler can form fits a profile."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankserve.tensorrt.profiles import (
    DEFAULT_BUCKETS,
    Profile,
    plan_profiles,
    rows_at,
    select_profile,
    shape_limits,
    split_rows,
)


def test_default_plan_for_the_cuda_batch_budget() -> None:
    profiles = plan_profiles(max_batch_size=64, max_batch_tokens=16384, max_seq_length=8192)
    assert [p.max for p in profiles] == [(64, 128), (64, 256), (63, 512), (31, 1024), (15, 2048), (7, 4096), (3, 8192)]
    assert [p.min for p in profiles] == [(1, 1), (1, 129), (1, 257), (1, 513), (1, 1025), (1, 2049), (1, 4097)]
    assert [p.opt for p in profiles] == [(64, 128), (64, 256), (32, 512), (16, 1024), (8, 2048), (4, 4096), (2, 8192)]


def test_buckets_are_clipped_to_the_longest_sequence() -> None:
    profiles = plan_profiles(max_batch_size=8, max_batch_tokens=4096, max_seq_length=700, buckets=(256, 512, 1024))
    assert [p.max[1] for p in profiles] == [256, 512, 700]


def test_a_sequence_longer_than_the_budget_still_gets_a_row() -> None:
    (profile,) = plan_profiles(max_batch_size=64, max_batch_tokens=512, max_seq_length=8192, buckets=())
    assert profile.max == (64, 8192) and profile.min == (1, 1)  # batch 1 of 8192 tokens must run
    profiles = plan_profiles(max_batch_size=64, max_batch_tokens=512, max_seq_length=8192, buckets=(4096,))
    assert profiles[-1].max == (1, 8192)


def test_profile_rejects_inconsistent_shapes() -> None:
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Profile(min=(1, 1), opt=(8, 128), max=(4, 128))
    with pytest.raises(ValueError):
        plan_profiles(max_batch_size=0, max_batch_tokens=1, max_seq_length=1)


def test_selection_prefers_the_smallest_covering_profile() -> None:
    overlapping = [
        Profile((1, 1), (8, 2048), (8, 2048)),
        Profile((1, 1), (16, 512), (16, 512)),
        Profile((1, 1), (64, 512), (64, 512)),
    ]
    assert select_profile(overlapping, 4, 100) == 1
    assert select_profile(overlapping, 32, 100) == 2
    assert select_profile(overlapping, 4, 1000) == 0
    assert select_profile(overlapping, 9, 1000) is None


@settings(max_examples=60, deadline=None)
@given(
    max_batch=st.integers(1, 128),
    budget=st.integers(16, 65536),
    max_seq=st.integers(1, 2048),
    buckets=st.lists(st.integers(1, 4096), max_size=8),
    data=st.data(),
)
def test_every_schedulable_batch_fits_one_profile(
    max_batch: int, budget: int, max_seq: int, buckets: list[int], data: st.DataObject
) -> None:
    profiles = plan_profiles(max_batch_size=max_batch, max_batch_tokens=budget, max_seq_length=max_seq, buckets=buckets)
    limits = shape_limits(profiles)
    assert limits.max_length == max_seq
    assert limits.max_batch_size == min(max_batch, budget)
    assert limits.max_batch_tokens >= min(budget, max_batch * max_seq)
    # What the scheduler forms: rows <= max_batch, rows x longest <= budget, or a single (possibly long) sequence.
    seq = data.draw(st.integers(1, max_seq))
    rows = data.draw(st.integers(1, max(1, min(max_batch, budget // seq))))
    index = select_profile(profiles, rows, seq)
    assert index is not None and profiles[index].covers(rows, seq)
    assert split_rows(profiles, rows, seq) == [(0, rows, index)]


@settings(max_examples=40, deadline=None)
@given(budget=st.integers(16, 20000), max_batch=st.integers(1, 64), rows=st.integers(1, 200), seq=st.integers(1, 1024))
def test_split_covers_every_row_once_with_fitting_chunks(budget: int, max_batch: int, rows: int, seq: int) -> None:
    profiles = plan_profiles(max_batch_size=max_batch, max_batch_tokens=budget, max_seq_length=1024)
    chunks = split_rows(profiles, rows, seq)
    assert chunks[0][0] == 0 and chunks[-1][1] == rows
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    assert all(profiles[i].covers(stop - start, seq) for start, stop, i in chunks)
    assert len(chunks) == -(-rows // max(rows_at(profiles, seq), 1)) or len(chunks) == 1


def test_limits_read_from_profiles_with_a_gap() -> None:
    # Built elsewhere: nothing covers 257..300 at batch 1, so only up to 256 tokens can be served.
    profiles = [Profile((1, 1), (8, 256), (8, 256)), Profile((1, 301), (2, 1024), (2, 1024))]
    limits = shape_limits(profiles)
    assert limits.max_length == 256
    assert limits.max_batch_size == 8
    assert split_rows(profiles, 4, 500) == [(0, 2, 1), (2, 4, 1)]
    with pytest.raises(ValueError, match="no optimization profile accepts sequences of 280"):
        split_rows(profiles, 1, 280)


def test_limits_token_budget_is_exact() -> None:
    profiles = plan_profiles(max_batch_size=64, max_batch_tokens=16384, max_seq_length=8192, buckets=DEFAULT_BUCKETS)
    limits = shape_limits(profiles)
    tokens = limits.max_batch_tokens
    for seq in range(1, 8193):  # every batch within the derived budget fits; the budget is the largest that does
        assert rows_at(profiles, seq) >= min(64, tokens // seq)
    assert any(rows_at(profiles, seq) < min(64, (tokens + 1) // seq) for seq in range(1, 8193))

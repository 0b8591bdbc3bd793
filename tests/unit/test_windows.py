"""Truncate.WINDOW: a long passage becomes overlapping (query, window) pairs, scored alone, the max kept.

The ground truth is the normal path: a window's text sent as an ordinary passage (`Truncate.NONE`) must give
exactly the ids and the logit the window got.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rankserve.errors import InputTooLong, TooManyWindows
from rankserve.ranker import LongDocuments, PairEncoder, Ranker, RankRequest, Truncate
from rankserve.timing import RequestTiming
from rankserve.windows import estimate_windows, overlap_tokens

BOS, EOS = 128000, 128001
MAX_LENGTH = 48
QUERY = "how much protein should a female eat?"
LONG = (
    "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per "
    "day. But, as you can see from this chart, you'll need to increase that if you're expecting or training for "
    "a marathon. 蛋白质 👩🏽‍🔬 Check out the chart below to see how much protein you should be eating each day:"
    "passage:question: and the rest.   "
)
SHORT = "Calorie intake should not fall below 1,200 a day."


class AloneScorer:
    """Scores every sequence alone (batch of one, no padding) with the tiny fp32 model; records what it saw."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.calls: list[list[list[int]]] = []
        self.logits: list[float] = []

    def check_capacity(self) -> None:
        pass

    async def submit(
        self, sequences: Sequence[np.ndarray], timeout: float | None = None, timing: RequestTiming | None = None
    ) -> np.ndarray:
        self.calls.append([s.tolist() for s in sequences])
        out = np.array([self.alone(s.tolist()) for s in sequences], dtype=np.float32)
        self.logits.extend(out.tolist())
        return out

    def alone(self, ids: list[int]) -> float:
        with torch.inference_mode():
            out = self.model(torch.tensor([ids]), torch.tensor([len(ids)]))
        return float(np.float32(out[0].item()))


@pytest.fixture(scope="module")
def encoder(tiny_encoder: PairEncoder) -> PairEncoder:
    return PairEncoder(tiny_encoder.tokenizer, BOS, MAX_LENGTH)


def rank(ranker: Ranker, passages: list[str], truncate: Truncate, query: str = QUERY, top_n: int | None = None):
    return asyncio.run(ranker.rank(RankRequest(query=query, passages=passages, truncate=truncate, top_n=top_n)))


def windows_of(encoder: PairEncoder, passage: str, query: str = QUERY, overlap: float = 0.125):
    offsets = encoder.tokenizer.encode(passage, add_special_tokens=False).offsets
    return encoder.passage_windows(query, passage, offsets, encoder.window_room(query), overlap)


def test_each_window_is_the_normal_pair_of_its_text_and_the_max_is_returned(encoder, tiny_model_fp32) -> None:
    scorer = AloneScorer(tiny_model_fp32)
    result = rank(Ranker(encoder, scorer), [LONG], Truncate.WINDOW)
    (sent,) = scorer.calls
    windows = windows_of(encoder, LONG)
    assert len(windows) >= 3 and len(sent) == len(windows)
    for w, ids, logit in zip(windows, sent, scorer.logits, strict=True):
        # The window text is a slice of the passage and goes through the one-sequence template...
        assert w.text in LONG
        (normal,) = encoder.encode(QUERY, [w.text], Truncate.NONE)
        assert ids == w.ids == normal.tolist()
        assert ids[0] == BOS and ids.count(BOS) == 1 and EOS not in ids and len(ids) <= MAX_LENGTH
        # ... so its logit is the logit of that text scored alone through the normal path.
        alone = rank(Ranker(encoder, AloneScorer(tiny_model_fp32)), [w.text], Truncate.NONE)
        assert alone.rankings[0].logit == logit
    assert len(set(scorer.logits)) > 1  # the windows do score differently: the max is a real choice
    assert result.rankings[0].logit == max(scorer.logits)
    assert result.prompt_tokens == sum(len(ids) for ids in sent)  # usage counts every window


def test_short_passage_is_identical_in_every_mode(encoder, tiny_model_fp32) -> None:
    scorer = AloneScorer(tiny_model_fp32)
    ranker = Ranker(encoder, scorer)
    results = [rank(ranker, [SHORT], t) for t in (Truncate.NONE, Truncate.END, Truncate.WINDOW)]
    assert scorer.calls[0] == scorer.calls[1] == scorer.calls[2]
    assert len({r.rankings[0].logit for r in results}) == 1
    assert len({r.prompt_tokens for r in results}) == 1


def test_query_too_long_for_any_window_is_cut_like_end(encoder, tiny_model_fp32) -> None:
    query = "protein " * 60
    scorer = AloneScorer(tiny_model_fp32)
    ranker = Ranker(encoder, scorer)
    end, window = rank(ranker, [LONG], Truncate.END, query), rank(ranker, [LONG], Truncate.WINDOW, query)
    assert scorer.calls[0] == scorer.calls[1] and len(scorer.calls[1]) == 1
    assert end == window
    with pytest.raises(InputTooLong):
        rank(ranker, [LONG], Truncate.NONE, query)


def test_repeated_passages_are_windowed_once_and_counted_each_time(encoder, tiny_model_fp32) -> None:
    scorer = AloneScorer(tiny_model_fp32)
    result = rank(Ranker(encoder, scorer), [LONG, SHORT, LONG], Truncate.WINDOW, top_n=2)
    windows = windows_of(encoder, LONG)
    (sent,) = scorer.calls
    assert len(sent) == len(windows) + 1
    long_tokens = sum(len(w.ids) for w in windows)
    assert result.prompt_tokens == 2 * long_tokens + len(sent[-1])
    # Copies tie: lower index first.
    by_index = {r.index: r.logit for r in rank(Ranker(encoder, scorer), [LONG, SHORT, LONG], Truncate.WINDOW).rankings}
    assert by_index[0] == by_index[2]
    assert len(result.rankings) == 2


def test_setting_window_turns_end_into_window_but_not_none(encoder, tiny_model_fp32) -> None:
    scorer = AloneScorer(tiny_model_fp32)
    ranker = Ranker(encoder, scorer, long_documents=LongDocuments(mode="window"))
    assert rank(ranker, [LONG], Truncate.END) == rank(Ranker(encoder, scorer), [LONG], Truncate.WINDOW)
    with pytest.raises(InputTooLong):
        rank(ranker, [LONG], Truncate.NONE)


def test_window_cap(encoder, tiny_model_fp32) -> None:
    n = len(windows_of(encoder, LONG))
    scorer = AloneScorer(tiny_model_fp32)
    ok = Ranker(encoder, scorer, long_documents=LongDocuments(max_windows=n + 1))
    rank(ok, [LONG, SHORT], Truncate.WINDOW)  # n windows + 1 short passage: exactly at the cap
    tight = Ranker(encoder, scorer, long_documents=LongDocuments(max_windows=n))
    with pytest.raises(TooManyWindows, match=f"more than {n} windows"):
        rank(tight, [LONG, SHORT], Truncate.WINDOW)
    rank(tight, [LONG], Truncate.WINDOW)
    rank(tight, [LONG, SHORT], Truncate.END)  # the cap is about windows only
    assert len(scorer.calls) == 3  # a refused request reaches no engine


def test_encode_refuses_window_mode(encoder) -> None:
    with pytest.raises(ValueError, match="encode_windows"):
        encoder.encode(QUERY, [SHORT], Truncate.WINDOW)


def test_estimate_and_overlap() -> None:
    assert overlap_tokens(32, 0.125) == 4 and overlap_tokens(1, 0.5) == 0 and overlap_tokens(4, 0.5) == 2
    assert estimate_windows(10, 32, 0.125) == 1
    assert estimate_windows(32, 32, 0.125) == 1
    assert estimate_windows(33, 32, 0.125) == 2
    assert estimate_windows(32 + 28 * 3, 32, 0.125) == 4


# Properties ------------------------------------------------------------------------------------------------------

PIECES = [" ", "  ", "\n", "é", "e\u0301", "蛋白质", "🥚", "👩🏽‍🔬", "protein", "passage:", ":", "1,200", "'s", "a"]
LONG_TEXT = st.lists(st.sampled_from(PIECES), min_size=1, max_size=80).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    query=st.lists(st.sampled_from(PIECES), max_size=4).map("".join),
    passage=LONG_TEXT,
    max_length=st.integers(16, 48),
    overlap=st.sampled_from([0.0, 0.125, 0.5]),
)
@example(query="👩🏽\u200d🔬👩🏽\u200d🔬 ", passage="é", max_length=28, overlap=0.0)  # fits whole, though n > room
@example(query="👩🏽\u200d🔬👩🏽\u200d🔬", passage=" 蛋白质", max_length=27, overlap=0.0)  # 1-token windows are cut
def test_windows_cover_every_token_and_fit(tiny_encoder, query, passage, max_length, overlap) -> None:
    encoder = PairEncoder(tiny_encoder.tokenizer, BOS, max_length)
    offsets = encoder.tokenizer.encode(passage, add_special_tokens=False).offsets
    room = encoder.window_room(query)
    assert room == max_length - 1 - len(
        encoder.tokenizer.encode(f"question:{query} \n \n passage:", add_special_tokens=False).ids
    )
    if room < 1:
        return
    windows = encoder.passage_windows(query, passage, offsets, room, overlap)
    assert windows[0].start == 0 and windows[-1].end == len(offsets)
    for prev, nxt in itertools.pairwise(windows):
        assert prev.start < nxt.start <= prev.end  # progress, and overlap >= 0: no token is skipped
    for w in windows:
        assert 0 <= w.start < w.end <= len(offsets)
        assert len(w.ids) <= max_length
        assert w.ids[0] == BOS and w.ids.count(BOS) == 1
        assert w.text == passage[offsets[w.start][0] : offsets[w.end - 1][1]]
        (normal,) = encoder.encode(query, [w.text], Truncate.END)
        assert normal.tolist() == w.ids  # the normal path for the window's text...
        if len(encoder._pair_ids(query, [w.text])[0]) + 1 > max_length:
            # ... cut only in the degenerate case: one token that does not fit next to the query (re-tokenizing
            # at the `passage:` boundary can take more room than the empty-passage template predicted).
            assert w.end - w.start == 1 and len(w.ids) == max_length
    (pair,) = encoder.encode(query, [passage], Truncate.END)
    groups = encoder.encode_windows(query, [passage], overlap, 10_000)
    if len(encoder._pair_ids(query, [passage])[0]) + 1 <= max_length:
        assert [g.tolist() for g in groups[0]] == [pair.tolist()]  # a pair that fits is never windowed
    else:
        assert [g.tolist() for g in groups[0]] == [w.ids for w in windows]

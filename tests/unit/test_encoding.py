"""PairEncoder (template, BOS, truncation, the over-length error), token counts and sort_rankings.

The ground truth throughout is the tokenizer itself: `[BOS] + tokenizer.encode(format_pair(q, p),
add_special_tokens=False).ids`, the whole pair as one sequence (model.md, "Input sequence").
"""

from __future__ import annotations

import asyncio
import itertools
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from rankserve.errors import InputTooLong
from rankserve.ranker import PairEncoder, Ranker, RankRequest, Truncate, format_pair, sort_rankings

BOS, EOS = 128000, 128001
TEMPLATE_HEAD = "question:"
TEMPLATE_SEP = " \n \n passage:"

# Any unicode except lone surrogates (not encodable as UTF-8, so never in a JSON request body).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=120)
# Text made of the troublesome pieces, so they meet each other and the template's boundaries.
PIECES = [
    " ",
    "  ",
    "\n",
    "\t",
    "\u200b",
    "\u200d",
    "\u0301",
    "é",
    "e\u0301",
    "蛋白质",
    "한국어",
    "بروتين",
    "प्रोटीन",
    "🥚",
    "👩🏽‍🔬",
    "Ω",
    "a",
    "protein",
    "?",
    ":",
    "passage:",
    "'s",
    "1,200",
    "\r\n",
    "\\n",
]
PIECE_TEXT = st.lists(st.sampled_from(PIECES), max_size=20).map("".join)
ANY_TEXT = st.one_of(TEXT, PIECE_TEXT)
SETTINGS = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="session")
def tokenizer(tiny_encoder: PairEncoder) -> Tokenizer:
    return tiny_encoder.tokenizer


def untruncated(tokenizer: Tokenizer, query: str, passage: str) -> list[int]:
    return [BOS, *tokenizer.encode(format_pair(query, passage), add_special_tokens=False).ids]


def encoder_for(tokenizer: Tokenizer, max_length: int) -> PairEncoder:
    return PairEncoder(tokenizer, BOS, max_length)


# Properties ------------------------------------------------------------------------------------------------------


@SETTINGS
@given(query=ANY_TEXT, passages=st.lists(ANY_TEXT, min_size=1, max_size=3), max_length=st.integers(8, 64))
def test_end_truncation_is_a_prefix(tokenizer, query: str, passages: list[str], max_length: int) -> None:
    out = encoder_for(tokenizer, max_length).encode(query, passages, Truncate.END)
    assert len(out) == len(passages)
    for seq, passage in zip(out, passages, strict=True):
        full = untruncated(tokenizer, query, passage)
        assert seq.dtype == np.int32
        assert seq[0] == BOS
        assert len(seq) <= max_length
        # Cut from the right: the passage tail goes first.
        assert len(seq) == min(len(full), max_length)
        assert seq.tolist() == full[: len(seq)]
        # The query and the template (up to the word "passage") are kept whenever they fit. Their tokens are
        # the same alone as inside the pair: "passage" ends a pre-token whatever the passage starts with.
        head = tokenizer.encode(TEMPLATE_HEAD + query + TEMPLATE_SEP[:-1], add_special_tokens=False).ids
        assert full[1 : len(head) + 1] == head
        if len(head) + 1 <= max_length:
            assert seq.tolist()[1 : len(head) + 1] == head
            kept = tokenizer.decode(seq.tolist()[1:], skip_special_tokens=False)
            assert kept.startswith(TEMPLATE_HEAD + query + TEMPLATE_SEP[:-1])


@SETTINGS
@given(query=ANY_TEXT, passages=st.lists(ANY_TEXT, min_size=1, max_size=3), max_length=st.integers(8, 64))
def test_none_rejects_exactly_the_too_long(tokenizer, query: str, passages: list[str], max_length: int) -> None:
    encoder = encoder_for(tokenizer, max_length)
    fulls = [untruncated(tokenizer, query, p) for p in passages]
    too_long = [len(f) for f in fulls if len(f) > max_length]
    if too_long:
        with pytest.raises(InputTooLong) as info:
            encoder.encode(query, passages, Truncate.NONE)
        # The first offending pair is reported, with its untruncated length (BOS included).
        assert info.value.length == too_long[0]
        assert info.value.limit == max_length
        assert str(info.value) == f"Input length {too_long[0]} exceeds maximum allowed token size {max_length}"
        assert info.value.message == str(info.value)
    else:
        out = encoder.encode(query, passages, Truncate.NONE)
        assert [s.tolist() for s in out] == fulls


@SETTINGS
@given(
    query=ANY_TEXT,
    passages=st.lists(st.one_of(ANY_TEXT, st.sampled_from(["", "dup", "dup "])), min_size=1, max_size=4),
    max_length=st.integers(8, 64),
)
def test_prompt_tokens_count_what_is_scored(tokenizer, query: str, passages: list[str], max_length: int) -> None:
    class Scorer:
        seen: list[np.ndarray]

        def check_capacity(self) -> None:
            pass

        async def submit(self, sequences, timeout=None, timing=None):
            self.seen = list(sequences)
            return np.arange(len(sequences), 0, -1, dtype=np.float32)  # first unique passage scores highest

    scorer = Scorer()
    ranker = Ranker(encoder_for(tokenizer, max_length), scorer)
    result = asyncio.run(ranker.rank(RankRequest(query=query, passages=passages, truncate=Truncate.END)))
    # A repeated passage is scored once (Ranker dedupes) but counted in usage each time it appears.
    unique = list(dict.fromkeys(passages))
    assert [s.tolist() for s in scorer.seen] == [untruncated(tokenizer, query, p)[:max_length] for p in unique]
    expected = sum(min(len(untruncated(tokenizer, query, p)), max_length) for p in passages)
    assert result.prompt_tokens == expected
    logits = np.array([len(unique) - unique.index(p) for p in passages], dtype=np.float32)
    assert result.rankings == sort_rankings(logits)


# Edge cases ------------------------------------------------------------------------------------------------------


ADVERSARIAL = [
    "trailing space ",
    "trailing spaces   ",
    "trailing newline\n",
    "trailing newlines\n\n\n",
    "\r\nwindows\r\n",
    "tab\tseparated\t",
    "emoji 🥚🍗💪🏽 👩‍👩‍👧‍👦",
    "蛋白质的每日推荐摄入量",
    "كم من البروتين",
    "e\u0301\u0301 combining a\u0308\u0323",
    "zero\u200bwidth\u200c\u200djoiners\ufeff",
    "\u200b",
    " ",
    "\n",
    "\\n literal backslash-n",
    "question: passage: \n \n passage:",
    "\x00 nul and \x7f del",
    "\U0010ffff private plane",
]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_adversarial_text_is_one_sequence(tiny_encoder: PairEncoder, tokenizer, text: str) -> None:
    for query, passage in ((text, "passage"), ("query", text), (text, text)):
        for truncate in (Truncate.NONE, Truncate.END):
            (seq,) = tiny_encoder.encode(query, [passage], truncate)
            assert seq.tolist() == untruncated(tokenizer, query, passage)
            assert seq.tolist().count(BOS) == 1
            assert EOS not in seq.tolist()
            # Byte-level BPE: nothing is lost, whitespace and invisible characters included.
            assert tokenizer.decode(seq.tolist()[1:], skip_special_tokens=False) == format_pair(query, passage)


def test_empty_strings_are_a_valid_sequence(tiny_encoder: PairEncoder, tokenizer) -> None:
    # The API rejects empty strings; the encoder itself gives BOS + template.
    (seq,) = tiny_encoder.encode("", [""], Truncate.NONE)
    assert seq.tolist() == [BOS, *tokenizer.encode("question: \n \n passage:", add_special_tokens=False).ids]
    assert tiny_encoder.encode("q", [], Truncate.NONE) == []


@pytest.mark.parametrize(
    ("text", "special"),
    [("<|begin_of_text|>", BOS), ("<|end_of_text|>", EOS), ("see <|eot_id|> here", 128009)],
)
def test_special_token_text_behaves_like_the_tokenizer(tiny_encoder, tokenizer, text: str, special: int) -> None:
    """Documents current behaviour: special-token strings in user text become the special token.

    The Hugging Face tokenizer matches added (special) tokens inside the text even with
    `add_special_tokens=False`, and so does the model card's reference (transformers' tokenizer call). We behave
    exactly like `Tokenizer.encode(format_pair(...), add_special_tokens=False)`: a query or passage containing the
    literal "<|begin_of_text|>" yields a second 128000, "<|end_of_text|>" yields a 128001 inside the sequence.
    """
    for query, passage in ((text, "p"), ("q", text)):
        (seq,) = tiny_encoder.encode(query, [passage], Truncate.NONE)
        ids = seq.tolist()
        assert ids == untruncated(tokenizer, query, passage)
        assert ids[0] == BOS
        assert special in ids[1:]


def test_max_length_bounds(tokenizer) -> None:
    with pytest.raises(ValueError):
        PairEncoder(tokenizer, BOS, 1)
    # max_length 2: BOS and one token.
    (seq,) = PairEncoder(tokenizer, BOS, 2).encode("q", ["p"], Truncate.END)
    assert seq.tolist() == untruncated(tokenizer, "q", "p")[:2]
    with pytest.raises(InputTooLong, match=re.escape("exceeds maximum allowed token size 2")):
        PairEncoder(tokenizer, BOS, 2).encode("q", ["p"], Truncate.NONE)


def test_exact_fit_is_not_too_long(tokenizer) -> None:
    query, passage = "how much protein", "about 46 grams per day"
    full = untruncated(tokenizer, query, passage)
    (seq,) = PairEncoder(tokenizer, BOS, len(full)).encode(query, [passage], Truncate.NONE)
    assert seq.tolist() == full
    message = f"^Input length {len(full)} exceeds maximum allowed token size {len(full) - 1}$"
    with pytest.raises(InputTooLong, match=message):
        PairEncoder(tokenizer, BOS, len(full) - 1).encode(query, [passage], Truncate.NONE)


def test_long_query_is_cut_too(tokenizer) -> None:
    # Only when the query alone is too long does END cut into it (the passage is gone entirely then).
    query = "protein " * 100
    (seq,) = PairEncoder(tokenizer, BOS, 32).encode(query, ["a passage"], Truncate.END)
    assert len(seq) == 32
    assert "passage:" not in tokenizer.decode(seq.tolist())
    assert tokenizer.decode(seq.tolist()[1:]).startswith("question:protein protein")


# sort_rankings ---------------------------------------------------------------------------------------------------


def test_sort_rankings_examples() -> None:
    logits = np.array([0.5, 2.0, -1.0, 2.0, 0.5], dtype=np.float32)
    assert [r.index for r in sort_rankings(logits)] == [1, 3, 0, 4, 2]
    assert [r.logit for r in sort_rankings(logits)] == [2.0, 2.0, 0.5, 0.5, -1.0]
    assert [r.index for r in sort_rankings(logits, top_n=2)] == [1, 3]
    assert [r.index for r in sort_rankings(logits, top_n=0)] == []
    assert [r.index for r in sort_rankings(logits, top_n=99)] == [1, 3, 0, 4, 2]
    assert sort_rankings(np.array([], dtype=np.float32)) == []
    assert all(isinstance(r.logit, float) for r in sort_rankings(logits))
    assert sort_rankings(np.array([20.625]))[0].probability == pytest.approx(1 / (1 + np.exp(-20.625)))
    assert sort_rankings(np.array([-1000.0]))[0].probability == 0.0  # no overflow


@settings(max_examples=100, deadline=None)
@given(
    logits=st.lists(st.sampled_from([-3.0, -0.5, 0.0, 0.25, 1.0, 20.625]) | st.floats(-50, 50), max_size=12),
    top_n=st.none() | st.integers(0, 15),
)
def test_sort_rankings_properties(logits: list[float], top_n: int | None) -> None:
    arr = np.array(logits, dtype=np.float32)
    out = sort_rankings(arr, top_n)
    assert len(out) == (len(logits) if top_n is None else min(top_n, len(logits)))
    full = sort_rankings(arr)
    assert out == full[: len(out)]
    assert sorted(r.index for r in full) == list(range(len(logits)))
    for a, b in itertools.pairwise(full):
        assert a.logit > b.logit or (a.logit == b.logit and a.index < b.index)
        assert a.logit == float(arr[a.index])

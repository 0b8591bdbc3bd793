"""Over HTTP: long documents windowed (RANKSERVE_LONG_DOCUMENTS=window) and the score cache, with its metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rankserve.ranker import PairEncoder
from tests.integration._support import (
    Reference,
    ServerThread,
    assert_error,
    controlled_factory,
    metric,
    ranking_body,
    running,
    tiny_settings,
)

MAX_LENGTH = 64
QUERY = "how much protein should a female eat?"
LONG = " ".join(f"sentence {i} says protein matters for women ages 19 to 70." for i in range(12))
SHORT = "Calorie intake should not fall below 1,200 a day."


@pytest.fixture(scope="module")
def window_server(tiny_checkpoint_dir: Path) -> Iterator[ServerThread]:
    settings = tiny_settings(
        tiny_checkpoint_dir,
        max_seq_length=MAX_LENGTH,
        long_documents="window",
        score_cache_size=64,
        max_windows_per_request=12,
    )
    with running(ServerThread(settings, engine_factory=controlled_factory)) as s:
        yield s


def test_long_passage_is_windowed_scored_as_max_and_cached(window_server: ServerThread, reference: Reference) -> None:
    encoder: PairEncoder = window_server.state.runtime.encoder
    groups = encoder.encode_windows(QUERY, [LONG, SHORT], 0.125, 1000)
    assert len(groups[0]) > 1 and len(groups[1]) == 1
    expected = [max(reference.logit_ids(s.tolist()) for s in g) for g in groups]
    tokens = sum(len(s) for g in groups for s in g)
    engine = window_server.engine
    before = window_server.metrics()
    rows = engine.rows_scored
    with window_server.client() as client:
        first = client.post("/v1/ranking", json=ranking_body(QUERY, [LONG, SHORT], truncate="END"))
        again = client.post("/v1/ranking", json=ranking_body(QUERY, [SHORT, LONG], truncate="END"))
        refused = client.post("/v1/ranking", json=ranking_body(QUERY, [LONG, SHORT], truncate="NONE"))
    assert first.status_code == 200, first.text
    by_index = {r["index"]: r["logit"] for r in first.json()["rankings"]}
    assert by_index == pytest.approx({0: expected[0], 1: expected[1]}, abs=1e-4)
    assert first.json()["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    # The second request is served from the cache: nothing reaches the engine, usage is unchanged.
    assert again.status_code == 200
    assert {r["index"]: r["logit"] for r in again.json()["rankings"]} == {0: by_index[1], 1: by_index[0]}
    assert again.json()["usage"] == first.json()["usage"]
    assert engine.rows_scored - rows == len(groups[0]) + 1
    assert_error(refused, 422, "exceeds maximum allowed token size")  # NONE still means NONE
    after = window_server.metrics()
    assert metric(after, "rankserve_cache_hits_total") - metric(before, "rankserve_cache_hits_total") == 2
    # Misses: the first request's two passages, and the NONE request's (another mode is another key).
    assert metric(after, "rankserve_cache_misses_total") - metric(before, "rankserve_cache_misses_total") == 4
    assert metric(after, "rankserve_cache_entries") >= 2
    assert metric(after, "rankserve_cache_max_entries") == 64


def test_too_many_windows_is_a_422(window_server: ServerThread) -> None:
    with window_server.client() as client:
        r = client.post("/v1/ranking", json=ranking_body(QUERY, [LONG * 4], truncate="END"))
    body = assert_error(r, 422, "more than 12 windows")
    assert body["type"] == "too_many_windows"

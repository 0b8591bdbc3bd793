"""Many concurrent clients: every answer equals scoring each pair alone, and requests share engine batches."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import httpx
import numpy as np

from tests.integration._support import (
    ControlledEngine,
    Reference,
    ServerThread,
    assert_matches_reference,
    metric,
    ranking_body,
)

CLIENTS = 32
VOCABULARY = (
    "retrieval rerank passage query model token batch latency throughput gpu cpu memory cache vector index "
    "search answer question relevance score logit sigmoid server client request response llama nemotron "
    "the of and a to in is it that for on with as by at from or an be this which"
)
WORDS = VOCABULARY.split()


def workload(seed: int = 20240611) -> tuple[list[str], list[list[str]], list[int]]:
    """Four queries shared round-robin by the clients (so a batch mixing queries mixes requests), and a pool of
    60 passages from a few words to a few hundred tokens; each client asks about 1..60 of them."""
    rng = np.random.default_rng(seed)
    queries = [" ".join(rng.choice(WORDS, size=n)) for n in (3, 6, 10, 16)]
    lengths = np.unique(np.geomspace(2, 250, 60).astype(int))
    lengths = np.concatenate([lengths, rng.integers(2, 250, 60 - len(lengths))])
    pool = [" ".join(rng.choice(WORDS, size=int(n))) + f" #{i}" for i, n in enumerate(lengths)]
    passage_sets = []
    counts = [1, 60, *rng.integers(1, 61, CLIENTS - 2)]
    for count in counts:
        picked = rng.choice(len(pool), size=int(count), replace=False)
        passage_sets.append([pool[i] for i in picked])
    return queries, passage_sets, [i % len(queries) for i in range(CLIENTS)]


def test_concurrent_clients_match_one_at_a_time(server: ServerThread, reference: Reference) -> None:
    queries, passage_sets, query_of = workload()
    # The reference first (one pair at a time, fp32), and which query each exact id sequence belongs to.
    expected = [reference.logits(queries[query_of[c]], passage_sets[c]) for c in range(CLIENTS)]
    owner = {
        tuple(reference.ids(queries[query_of[c]], p)): query_of[c] for c in range(CLIENTS) for p in passage_sets[c]
    }
    assert max(len(ids) for ids in owner) > 200 and min(len(ids) for ids in owner) < 20

    engine: ControlledEngine = server.engine
    seen_batches = len(engine.batches)
    before = server.metrics()

    async def one(client: httpx.AsyncClient, c: int) -> httpx.Response:
        return await client.post("/v1/ranking", json=ranking_body(queries[query_of[c]], passage_sets[c]))

    async def run_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
            return await asyncio.gather(*(one(client, c) for c in range(CLIENTS)))

    responses = asyncio.run(asyncio.wait_for(run_all(), 60))

    for c, r in enumerate(responses):
        assert r.status_code == 200, (c, r.text)
        body: dict[str, Any] = r.json()
        assert_matches_reference(body, expected[c])
        # Same order as the reference, up to logits closer than the tolerance.
        ref = expected[c]
        order = [e["index"] for e in body["rankings"]]
        assert all(ref[a] >= ref[b] - 2e-4 for a, b in itertools.pairwise(order))
        tokens = sum(reference.length(queries[query_of[c]], p) for p in passage_sets[c])
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    # Cross-request batching, seen by the engine: some batch holds sequences of different queries.
    batches = engine.batches[seen_batches:]
    sequences = sum(len(s) for s in passage_sets)
    assert sum(len(b) for b in batches) == sequences
    mixed = [b for b in batches if len({owner[row] for row in b}) > 1]
    assert mixed, "no engine batch mixed sequences of different requests"

    # ... and from /v1/metrics: fewer batches than sequences, some batches larger than one.
    after = server.metrics()
    n_batches = metric(after, "rankserve_batch_size_count") - metric(before, "rankserve_batch_size_count")
    n_sequences = metric(after, "rankserve_batch_size_sum") - metric(before, "rankserve_batch_size_sum")
    assert n_sequences == sequences
    assert n_batches == len(batches) < sequences
    singles = metric(after, "rankserve_batch_size_bucket", le="1.0") - metric(
        before, "rankserve_batch_size_bucket", le="1.0"
    )
    assert singles < n_batches
    ok = metric(after, "rankserve_requests_total", route="/v1/ranking", status="200") - metric(
        before, "rankserve_requests_total", route="/v1/ranking", status="200"
    )
    assert ok == CLIENTS

"""`rankserve eval` without a server: BEIR loading, BM25 and run-file first stages, metrics against hand-computed
values, dialect request/response shapes, retries (httpx mock transport), the score cache, and lazy imports.

`write_fixture` and `expected` are also used by tests/integration/test_eval_e2e.py."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from rankserve.eval import metrics
from rankserve.eval.cache import RunCache, input_hash
from rankserve.eval.client import (
    Dialect,
    RerankClient,
    RerankFailed,
    RetryPolicy,
    build_request,
    parse_scores,
    retry_after,
)
from rankserve.eval.command import format_table
from rankserve.eval.data import Document, EvalError, load_beir
from rankserve.eval.first_stage import bm25, read_trec_run
from rankserve.eval.runner import rerank_order

# -- the fixture: 6 evaluated queries, 40 documents, graded qrels ---------------------------------------------------
#
# Query i (1..6) is "what is kw<i>?"; documents 6(i-1) .. 6(i-1)+5 contain kw<i> 6, 5, 4, 3, 2, 1 times, so BM25
# ranks them in that order (every document has the same length: 10 tokens). Documents 36-39 share no query term.

N_DOCS = 40
BLOCK = 6


def doc_id(j: int) -> str:
    return f"d{j:02d}"


def block(i: int) -> list[str]:
    """Query i's matching documents in BM25 order (most occurrences of kw<i> first)."""
    return [doc_id((i - 1) * BLOCK + o) for o in range(BLOCK)]


def _qrels() -> dict[str, dict[str, int]]:
    b = {i: block(i) for i in range(1, 7)}
    return {
        "q1": {b[1][5]: 2, b[1][4]: 1, "d36": 1, b[1][0]: 0},  # d36 shares no term with q1: BM25 never finds it
        "q2": {b[2][0]: 1, b[2][2]: 2},
        "q3": {b[3][3]: 2, b[3][1]: 1, b[3][2]: 1},
        "q4": {"d37": 2, b[4][4]: 1},
        "q5": {b[5][1]: 2},
        "q6": {b[6][5]: 1, b[6][0]: 0},  # its only relevant document is BM25's 6th: cut by --top-k 5
        "q7": {b[1][1]: 0},  # judged, nothing relevant: skipped
        "q8": {b[1][1]: 1},  # not in queries.jsonl: skipped
    }


@dataclass
class Fixture:
    root: Path
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]

    def query_id(self, text: str) -> str:
        return next(q for q, t in self.queries.items() if t == text)

    @property
    def evaluated(self) -> list[str]:
        return [f"q{i}" for i in range(1, 7)]


def write_fixture(root: Path) -> Fixture:
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    queries = {f"q{i}": f"what is kw{i}?" for i in range(1, 8)}
    with (root / "corpus.jsonl").open("w") as f:
        for j in range(N_DOCS):
            i, o = j // BLOCK + 1, j % BLOCK
            tf = BLOCK - o if j < 6 * BLOCK else 0
            body = [f"kw{i}"] * tf + [f"z{j:02d}f{n}" for n in range(7 - tf)]
            f.write(json.dumps({"_id": doc_id(j), "title": f"Title {j:02d}", "text": " ".join([doc_id(j), *body])}))
            f.write("\n")
    with (root / "queries.jsonl").open("w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    qrels = _qrels()
    with (root / "qrels" / "test.tsv").open("w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, judged in qrels.items():
            for did, grade in judged.items():
                f.write(f"{qid}\t{did}\t{grade}\n")
    return Fixture(root=root, queries=queries, qrels=qrels)


# -- expected values, computed independently of pytrec_eval ---------------------------------------------------------


def recall(ranked: list[str], judged: dict[str, int], k: int) -> float:
    relevant = {d for d, g in judged.items() if g > 0}
    return len(relevant & set(ranked[:k])) / len(relevant)


def ndcg10(ranked: list[str], judged: dict[str, int]) -> float:
    dcg = sum(judged.get(d, 0) / math.log2(r + 2) for r, d in enumerate(ranked[:10]))
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:10]
    return dcg / sum(g / math.log2(r + 2) for r, g in enumerate(ideal))


def mrr10(ranked: list[str], judged: dict[str, int]) -> float:
    return next((1 / (r + 1) for r, d in enumerate(ranked[:10]) if judged.get(d, 0) > 0), 0.0)


def expected(qrels: dict[str, dict[str, int]], rankings: dict[str, list[str]]) -> dict[str, float]:
    """Mean over the queries of `rankings`."""
    per = [
        {
            "recall@5": recall(r, qrels[q], 5),
            "recall@10": recall(r, qrels[q], 10),
            "ndcg@10": ndcg10(r, qrels[q]),
            "mrr@10": mrr10(r, qrels[q]),
        }
        for q, r in rankings.items()
    ]
    return {m: sum(p[m] for p in per) / len(per) for m in metrics.METRICS}


def oracle_order(qrels: dict[str, dict[str, int]], qid: str, candidates: list[str]) -> list[str]:
    """What the fake server's scores produce: grade descending, then doc number ascending."""
    return sorted(candidates, key=lambda d: (-qrels[qid].get(d, 0), d))


def assert_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for m in want:
        assert abs(got[m] - want[m]) <= 1e-9, (m, got[m], want[m])


@pytest.fixture
def fx(tmp_path: Path) -> Fixture:
    return write_fixture(tmp_path / "data")


# -- data ---------------------------------------------------------------------------------------------------------


def test_load_beir(fx: Fixture) -> None:
    ds = load_beir(fx.root, "test")
    assert len(ds.corpus) == N_DOCS and ds.query_ids == fx.evaluated
    assert set(ds.skipped) == {"q7", "q8"}
    assert ds.qrels["q1"]["d36"] == 1 and ds.qrels["q1"]["d00"] == 0
    assert ds.corpus["d07"].passage().startswith("Title 07 d07 kw2")
    assert ds.corpus["d07"].passage(use_title=False).startswith("d07 kw2")
    assert Document(title="  ", text="t").passage() == "t"


def test_load_beir_errors(fx: Fixture) -> None:
    with pytest.raises(EvalError, match=r"missing .*dev.tsv \(this dataset has: test\)"):
        load_beir(fx.root, "dev")
    (fx.root / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\nnot json\n')
    with pytest.raises(EvalError, match=r"queries.jsonl:2: not valid JSON"):
        load_beir(fx.root)
    (fx.root / "queries.jsonl").unlink()
    with pytest.raises(EvalError, match=r"missing queries\.jsonl"):
        load_beir(fx.root)


# -- first stage ----------------------------------------------------------------------------------------------------


def test_bm25_ranks_by_term_frequency_and_drops_zero_scores(fx: Fixture) -> None:
    ds = load_beir(fx.root)
    run = bm25(ds, ds.query_ids, top_k=100)
    for i, q in enumerate(ds.query_ids, 1):
        assert [d for d, _ in run[q]] == block(i)  # only the 6 documents with kw<i>: no zero-score padding
        scores = [s for _, s in run[q]]
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == BLOCK
    assert [d for d, _ in bm25(ds, ["q1"], top_k=3, stemmer=None, stopwords=None)["q1"]] == block(1)[:3]


def test_bm25_unknown_stemmer(fx: Fixture) -> None:
    ds = load_beir(fx.root)
    with pytest.raises(EvalError, match="unknown stemmer 'klingon'"):
        bm25(ds, ds.query_ids, 5, stemmer="klingon")


def test_trec_run_file(fx: Fixture, tmp_path: Path) -> None:
    ds = load_beir(fx.root)
    path = tmp_path / "run.trec"
    path.write_text(
        "q1 Q0 d03 1 9.0 x\n"
        "q1 Q0 ghost 2 8.5 x\n"  # not in the corpus: dropped and counted
        "q1 Q0 d36 3 8.0 x\n"
        "q1 Q0 d05 2 8.0 x\n"  # same score as d36: the lower rank first
        "q1 Q0 d03 9 1.0 x\n"  # repeated document: its best line counts
        "\n"
        "q2 Q0 d06 1 1.0 x\n"
    )
    run, missing = read_trec_run(path, top_k=10, dataset=ds)
    assert missing == 1
    assert run == {"q1": [("d03", 9.0), ("d05", 8.0), ("d36", 8.0)], "q2": [("d06", 1.0)]}
    assert read_trec_run(path, top_k=2, dataset=ds)[0]["q1"] == [("d03", 9.0), ("d05", 8.0)]
    path.write_text("q1 d03 1 9.0\n")
    with pytest.raises(EvalError, match=r"run.trec:1: expected `qid Q0 docid rank score tag`"):
        read_trec_run(path, 10, ds)


# -- metrics --------------------------------------------------------------------------------------------------------


def test_metrics_match_hand_computed_values(fx: Fixture) -> None:
    # q1, BM25 top 5: d00 (grade 0), d01, d02, d03, d04 (grade 1); relevant: d05 (2), d04 (1), d36 (1).
    ranked = block(1)[:5]
    got = metrics.per_query(fx.qrels, {"q1": ranked})["q1"]
    idcg = 2 + 1 / math.log2(3) + 1 / math.log2(4)
    assert_close(got, {"recall@5": 1 / 3, "recall@10": 1 / 3, "ndcg@10": (1 / math.log2(6)) / idcg, "mrr@10": 1 / 5})
    # Reranked by grade: d05, d04, d00, ...
    got = metrics.per_query(fx.qrels, {"q1": oracle_order(fx.qrels, "q1", block(1))})["q1"]
    assert_close(got, {"recall@5": 2 / 3, "recall@10": 2 / 3, "ndcg@10": (2 + 1 / math.log2(3)) / idcg, "mrr@10": 1.0})


def test_metrics_against_independent_implementation(fx: Fixture) -> None:
    rankings = {q: [*block(i)[::-1], "d36", "d37", "d38"] for i, q in enumerate(fx.evaluated, 1)}
    rankings["q2"] = []  # no candidates: zero
    rankings["q3"] = ["d38"]  # nothing relevant
    per = metrics.per_query(fx.qrels, rankings)
    assert per["q2"] == dict.fromkeys(metrics.METRICS, 0.0) == per["q3"]
    nonempty = {q: r for q, r in rankings.items() if r}
    for q, r in nonempty.items():
        assert_close(per[q], expected(fx.qrels, {q: r}))
    assert_close(
        metrics.mean(per, fx.evaluated), {m: sum(per[q][m] for q in fx.evaluated) / 6 for m in metrics.METRICS}
    )


def test_rerank_order_ties_keep_first_stage_order() -> None:
    assert rerank_order(["a", "b", "c", "d"], [1.0, 3.0, 1.0, 3.0]) == ["b", "d", "a", "c"]


# -- dialects -------------------------------------------------------------------------------------------------------


def test_request_shapes() -> None:
    path, body = build_request(Dialect.NIM, None, "q", ["a", "b"])
    assert path == "/v1/ranking"
    assert body == {
        "model": "nvidia/llama-nemotron-rerank-1b-v2",
        "query": {"text": "q"},
        "passages": [{"text": "a"}, {"text": "b"}],
        "truncate": "END",
    }
    path, body = build_request(Dialect.COHERE, "m", "q", ["a", "b"])
    assert path == "/v1/rerank"
    assert body == {"model": "m", "query": "q", "documents": ["a", "b"], "top_n": 2, "return_documents": False}
    path, body = build_request(Dialect.TEI, "ignored", "q", ["a", "b"])
    assert path == "/rerank"
    assert body == {"query": "q", "texts": ["a", "b"], "truncate": True, "raw_scores": True}


def test_parse_scores() -> None:
    nim = {"rankings": [{"index": 1, "logit": 2.5}, {"index": 0, "logit": -1.0}], "usage": {}}
    assert parse_scores(Dialect.NIM, nim, 2) == [-1.0, 2.5]
    cohere = {"id": "x", "results": [{"index": 1, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.1}]}
    assert parse_scores(Dialect.COHERE, cohere, 2) == [0.1, 0.9]
    assert parse_scores(Dialect.TEI, [{"index": 0, "score": 3.0}, {"index": 1, "score": 4.0}], 2) == [3.0, 4.0]
    with pytest.raises(RerankFailed, match="no score for 1 of 2"):
        parse_scores(Dialect.TEI, [{"index": 0, "score": 3.0}], 2)
    with pytest.raises(RerankFailed, match="out of range or repeated"):
        parse_scores(Dialect.TEI, [{"index": 0, "score": 3.0}, {"index": 0, "score": 3.0}], 2)
    with pytest.raises(RerankFailed, match="want `index` and `logit`"):
        parse_scores(Dialect.NIM, {"rankings": [{"index": 0, "score": 1.0}]}, 1)
    with pytest.raises(RerankFailed, match="no list of results"):
        parse_scores(Dialect.COHERE, {"error": "x"}, 1)


def test_retry_after() -> None:
    assert retry_after("3") == 3.0 and retry_after("0") == 0.0 and retry_after(None) is None
    assert retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    policy = RetryPolicy(max_wait=5.0, backoff=0.5)
    assert policy.wait(0, "100") == 5.0 and policy.wait(2, None) == 2.0 and policy.wait(0, "0") == 0.0


def _client(handler, **kwargs) -> RerankClient:
    kwargs.setdefault("retry", RetryPolicy(retries=2, backoff=0.0))
    return RerankClient("http://fake", Dialect.TEI, transport=httpx.MockTransport(handler), **kwargs)


def _scores(client: RerankClient, passages: list[str]) -> list[float]:
    async def go() -> list[float]:
        async with client:
            return await client.scores("q", passages)

    return asyncio.run(go())


def test_client_retries_429_then_succeeds() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": "busy"})
        return httpx.Response(200, json=[{"index": 0, "score": 1.5}])

    client = _client(handler, api_key="k")
    assert _scores(client, ["p"]) == [1.5]
    assert client.requests == 2 and client.retries == 1
    assert seen[0].headers["authorization"] == "Bearer k" and seen[0].url.path == "/rerank"


def test_client_gives_up_after_bounded_retries() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": "loading", "detail": "model loading"})

    client = _client(handler)
    with pytest.raises(RerankFailed, match=r"gave up after 3 attempts: HTTP 503 .*model loading"):
        _scores(client, ["p"])
    assert len(calls) == 3


def test_client_does_not_retry_client_errors() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(422, json={"error": "bad", "detail": "passages: too many"})

    with pytest.raises(RerankFailed, match=r"HTTP 422 from http://fake/rerank: passages: too many"):
        _scores(_client(handler), ["p"])
    assert len(calls) == 1


def test_client_retries_transport_errors() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(RerankFailed, match=r"gave up after 3 attempts: ConnectError"):
        _scores(_client(handler), ["p"])
    assert len(calls) == 3


# -- cache ----------------------------------------------------------------------------------------------------------


def test_cache_round_trip_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    key = {"server": "http://s", "model": "m", "dialect": "nim", "top_k": 5}
    h = input_hash("q", ["d1", "d2"], ["a", "b"])
    assert h != input_hash("q", ["d1", "d2"], ["a", "b "]) != input_hash("q", ["d2", "d1"], ["a", "b"])
    cache = RunCache(path, key)
    cache.put("q1", h, ["d1", "d2"], [0.5, -1.0])
    cache.close()
    with path.open("a") as f:
        f.write('{"server": "http://s", "trunc')  # a line cut short by a crash
    again = RunCache(path, key)
    assert again.get("q1", h) == [0.5, -1.0] and again.get("q1", "other") is None and again.unreadable == 1
    assert RunCache(path, {**key, "top_k": 6}).get("q1", h) is None
    assert RunCache(path, {**key, "model": "n"}).get("q1", h) is None
    assert RunCache(None, key).get("q1", h) is None


# -- CLI ------------------------------------------------------------------------------------------------------------


def test_cli_loads_no_eval_dependency_until_eval_runs() -> None:
    code = (
        "import sys\n"
        "from rankserve import cli\n"
        "try:\n    cli.main(['eval', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('bm25s', 'pytrec_eval', 'httpx', 'tqdm', 'Stemmer') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_cli_rejects_bad_first_stage(capsys: pytest.CaptureFixture[str]) -> None:
    from rankserve.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--data", "x", "--server", "http://s", "--first-stage", "run"])
    assert e.value.code == 2 and "`bm25` or `run FILE`" in capsys.readouterr().err


def test_format_table() -> None:
    zero = dict.fromkeys(metrics.METRICS, 0.0)
    report = {
        "dataset": "data/fiqa",
        "split": "test",
        "server": "http://s",
        "dialect": "nim",
        "model": "m",
        "top_k": 100,
        "first_stage": {"kind": "bm25"},
        "queries": {
            "evaluated": 3,
            "compared": 2,
            "reranked": 2,
            "from_cache": 1,
            "no_candidates": 0,
            "failed": 1,
            "skipped": 0,
        },
        "http": {"requests": 4, "retries": 2, "seconds": 1.25},
        "metrics": {"first_stage": zero, "reranked": {**zero, "ndcg@10": 0.5}, "first_stage_all_queries": zero},
    }
    table = format_table(report)
    assert "nDCG@10          0.0000     0.5000   +0.5000" in table
    assert "1 queries FAILED" in table and "4 HTTP requests (2 retries)" in table


def test_cli_input_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rankserve.cli import main

    for extra, message in (([], "is not a directory"), (["--top-k", "0"], "--top-k must be at least 1")):
        with pytest.raises(SystemExit) as e:
            main(["eval", "--data", str(tmp_path / "nope"), "--server", "http://127.0.0.1:9", *extra])
        assert e.value.code == 2 and message in capsys.readouterr().err

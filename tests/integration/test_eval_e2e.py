"""`rankserve eval` end to end over real loopback HTTP: a fake scoring server whose ordering is known (score =
relevance grade from the qrels, ties by doc id) in the NIM, Cohere and TEI dialects, so every metric is predictable
to 1e-9; resume from the cache, retries and failures; then the nim dialect against a real rankserve (plumbing)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rankserve.cli import main
from rankserve.eval.metrics import METRICS
from tests.integration._support import ServerThread, bound_socket
from tests.unit.test_eval import Fixture, assert_close, block, expected, oracle_order, write_fixture

DOC_ID = re.compile(r"\bd\d\d\b")


@dataclass
class FakeScorer:
    """Scores a passage by the grade of its document (found by its `dNN` token) for the query, in three dialects."""

    fx: Fixture | None = None
    calls: Counter[str] = field(default_factory=Counter)  # route → requests
    throttle_once: set[str] = field(default_factory=set)  # query ids answered 429 (Retry-After: 0) the first time
    throttled: set[str] = field(default_factory=set)
    broken: set[str] = field(default_factory=set)  # query ids always answered 503 (Retry-After: 0)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self, fx: Fixture) -> None:
        with self.lock:
            self.fx = fx
            self.calls.clear()
            self.throttle_once, self.throttled, self.broken = set(), set(), set()

    def score(self, qid: str, passage: str) -> float:
        assert self.fx is not None
        did = DOC_ID.search(passage)
        assert did, passage
        return self.fx.qrels[qid].get(did.group(), 0) * 10 - int(did.group()[1:]) / 100

    def handle(
        self, route: str, query: str, passages: list[str]
    ) -> tuple[JSONResponse | None, list[tuple[int, float]]]:
        assert self.fx is not None
        qid = self.fx.query_id(query)
        with self.lock:
            self.calls[route] += 1
            if qid in self.broken:
                return JSONResponse({"error": "overloaded", "detail": "injected"}, 503, {"Retry-After": "0"}), []
            if qid in self.throttle_once and qid not in self.throttled:
                self.throttled.add(qid)
                return JSONResponse({"error": "busy", "detail": "try again"}, 429, {"Retry-After": "0"}), []
        ranked = sorted(((i, self.score(qid, p)) for i, p in enumerate(passages)), key=lambda e: (-e[1], e[0]))
        return None, ranked


def fake_app(scorer: FakeScorer) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/ranking")
    async def nim(request: Request) -> Any:
        body = await request.json()
        assert body["truncate"] == "END" and body["model"]
        error, ranked = scorer.handle("nim", body["query"]["text"], [p["text"] for p in body["passages"]])
        return error or {"rankings": [{"index": i, "logit": s} for i, s in ranked], "usage": {"prompt_tokens": 1}}

    @app.post("/v1/rerank")
    async def cohere(request: Request) -> Any:
        body = await request.json()
        assert body["top_n"] == len(body["documents"]) and body["model"]
        error, ranked = scorer.handle("cohere", body["query"], body["documents"])
        results = [{"index": i, "relevance_score": s} for i, s in ranked[: body["top_n"]]]
        return error or {"id": "x", "results": results, "meta": {}}

    @app.post("/rerank")
    async def tei(request: Request) -> Any:
        body = await request.json()
        assert body["truncate"] is True and body["raw_scores"] is True and "model" not in body
        error, ranked = scorer.handle("tei", body["query"], body["texts"])
        return error or [{"index": i, "score": s} for i, s in ranked]

    return app


@dataclass
class Fake:
    url: str
    scorer: FakeScorer


@pytest.fixture(scope="module")
def _fake() -> Iterator[Fake]:
    scorer = FakeScorer()
    sock = bound_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(fake_app(scorer), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    try:
        yield Fake(url, scorer)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def fx(tmp_path: Path) -> Fixture:
    return write_fixture(tmp_path / "data")


@pytest.fixture
def fake(_fake: Fake, fx: Fixture) -> Fake:
    _fake.scorer.reset(fx)
    return _fake


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(["eval", "--no-progress", *args])
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


def bm25_expectations(fx: Fixture, top_k: int, queries: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    first = {q: block(int(q[1:]))[:top_k] for q in queries}
    reranked = {q: oracle_order(fx.qrels, q, first[q]) for q in queries}
    return expected(fx.qrels, first), expected(fx.qrels, reranked)


@pytest.mark.parametrize("dialect", ["nim", "cohere", "tei"])
def test_bm25_then_rerank_exact_metrics(
    dialect: str, fake: Fake, fx: Fixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out" / "report.json"
    code, out, err = run_cli(
        capsys, "--data", str(fx.root), "--server", fake.url + "/", "--dialect", dialect, "--top-k", "5",
        "--output", str(output), "--concurrency", "3",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(output.read_text())
    want_first, want_reranked = bm25_expectations(fx, 5, fx.evaluated)
    assert_close(report["metrics"]["first_stage"], want_first)
    assert_close(report["metrics"]["reranked"], want_reranked)
    assert want_reranked["ndcg@10"] > want_first["ndcg@10"]  # the fixture is not degenerate
    assert report["queries"] == {"evaluated": 6, "compared": 6, "reranked": 6, "from_cache": 0, "no_candidates": 0,
                                 "failed": 0, "skipped": 2}  # fmt: skip
    assert report["failures"] == [] and {s["query_id"] for s in report["skipped"]} == {"q7", "q8"}
    assert fake.scorer.calls == {dialect: 6} and report["http"]["requests"] == 6
    assert all(p["candidates"] == 5 and p["status"] == "reranked" for p in report["per_query"].values())
    assert (output.parent / "report.cache.jsonl").is_file()
    assert "Recall@5" in out and "nDCG@10" in out and "6 reranked (0 from cache), 0 failed" in out
    assert f"{want_reranked['recall@5']:.4f}" in out


def test_run_file_first_stage(fake: Fake, fx: Fixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Each query's candidates: its block reversed (worst BM25 first), then d36 and d37; q2 is absent from the run.
    run = tmp_path / "dense.trec"
    lists = {q: [*block(int(q[1:]))[::-1], "d36", "d37"] for q in fx.evaluated if q != "q2"}
    run.write_text(
        "".join(f"{q} Q0 {d} {r + 1} {100 - r} dense\n" for q, docs in lists.items() for r, d in enumerate(docs))
    )
    code, _out, err = run_cli(
        capsys, "--data", str(fx.root), "--server", fake.url, "--first-stage", "run", str(run), "--top-k", "7",
        "--output", str(tmp_path / "r.json"), "--no-cache",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    first = {q: lists[q][:7] if q in lists else [] for q in fx.evaluated}
    reranked = {q: oracle_order(fx.qrels, q, first[q]) for q in fx.evaluated}
    assert_close(report["metrics"]["first_stage"], expected(fx.qrels, first))
    assert_close(report["metrics"]["reranked"], expected(fx.qrels, reranked))
    assert report["first_stage"] == {"kind": "run", "path": str(run), "docs_not_in_corpus": 0}
    assert report["queries"]["no_candidates"] == 1 and report["per_query"]["q2"]["status"] == "no candidates"
    assert fake.scorer.calls == {"nim": 5} and report["cache"]["path"] is None
    assert not list(tmp_path.glob("*.cache.jsonl"))


def test_rerun_uses_the_cache(fake: Fake, fx: Fixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--data", str(fx.root), "--server", fake.url, "--top-k", "5", "--output", str(tmp_path / "a.json")]
    assert run_cli(capsys, *args)[0] == 0
    assert fake.scorer.calls == {"nim": 6}
    first = json.loads((tmp_path / "a.json").read_text())
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and fake.scorer.calls == {"nim": 6}  # no new HTTP call
    second = json.loads((tmp_path / "a.json").read_text())
    assert second["metrics"] == first["metrics"] and second["queries"]["from_cache"] == 6
    assert second["http"]["requests"] == 0 and "6 reranked (6 from cache)" in out
    # Another top-k, or another dialect, is another experiment: scored again.
    assert run_cli(capsys, *args, "--dialect", "tei")[0] == 0
    assert fake.scorer.calls == {"nim": 6, "tei": 6}


def test_429_is_retried(fake: Fake, fx: Fixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake.scorer.throttle_once = {"q1", "q4"}
    code, _, err = run_cli(
        capsys, "--data", str(fx.root), "--server", fake.url, "--top-k", "5", "--output", str(tmp_path / "o.json")
    )
    assert code == 0, err
    report = json.loads((tmp_path / "o.json").read_text())
    assert fake.scorer.calls == {"nim": 8} and report["http"] == {**report["http"], "requests": 8, "retries": 2}
    assert_close(report["metrics"]["reranked"], bm25_expectations(fx, 5, fx.evaluated)[1])


def test_a_failing_query_is_reported_not_dropped(
    fake: Fake, fx: Fixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.scorer.broken = {"q3"}
    output = tmp_path / "o.json"
    args = ["--data", str(fx.root), "--server", fake.url, "--top-k", "5", "--retries", "2", "--output", str(output)]
    code, out, err = run_cli(capsys, *args)
    assert code == 1
    assert "query q3 failed: gave up after 3 attempts: HTTP 503" in err
    assert "1 queries FAILED" in out and "5 reranked" in out
    report = json.loads(output.read_text())
    assert report["queries"]["failed"] == 1 and report["queries"]["compared"] == 5
    assert [f["query_id"] for f in report["failures"]] == ["q3"] and "injected" in report["failures"][0]["error"]
    assert report["per_query"]["q3"]["status"] == "failed" and report["per_query"]["q3"]["reranked"] is None
    assert fake.scorer.calls == {"nim": 5 + 3}
    ok = [q for q in fx.evaluated if q != "q3"]
    want_first, want_reranked = bm25_expectations(fx, 5, ok)
    assert_close(report["metrics"]["first_stage"], want_first)
    assert_close(report["metrics"]["reranked"], want_reranked)
    assert_close(report["metrics"]["first_stage_all_queries"], bm25_expectations(fx, 5, fx.evaluated)[0])
    # The rerun only retries the failed query (the others come from the cache).
    fake.scorer.broken = set()
    code, _, _ = run_cli(capsys, *args)
    assert code == 0 and fake.scorer.calls == {"nim": 5 + 3 + 1}
    assert json.loads(output.read_text())["queries"]["from_cache"] == 5


def test_unreachable_server_fails_every_query(fx: Fixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = bound_socket()  # bound, never listening: connections are refused
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        code, out, err = run_cli(capsys, "--data", str(fx.root), "--server", url, "--top-k", "3", "--retries", "1")
    finally:
        sock.close()
    assert code == 1 and err.count("gave up after 2 attempts: ConnectError") == 6
    assert "6 queries FAILED" in out


def test_against_real_rankserve(
    server: ServerThread, fx: Fixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Plumbing only: the tiny checkpoint's weights are random, so the numbers mean nothing."""
    output = tmp_path / "real.json"
    code, _out, err = run_cli(
        capsys, "--data", str(fx.root), "--server", server.url, "--top-k", "5", "--output", str(output),
        "--model", "nvidia/llama-nemotron-rerank-1b-v2",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(output.read_text())
    assert report["queries"]["reranked"] == 6 and report["queries"]["failed"] == 0 and report["http"]["requests"] == 6
    for column in ("first_stage", "reranked"):
        assert set(report["metrics"][column]) == set(METRICS)
        assert all(0.0 <= v <= 1.0 for v in report["metrics"][column].values())
    assert all(p["status"] == "reranked" for p in report["per_query"].values())
    assert_close(report["metrics"]["first_stage"], bm25_expectations(fx, 5, fx.evaluated)[0])


def test_a_candidate_without_text_ranks_last_and_fails_nothing(
    fake: Fake, fx: Fixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with (fx.root / "corpus.jsonl").open("a") as f:
        f.write(json.dumps({"_id": "dempty", "title": "", "text": ""}) + "\n")
    run = tmp_path / "dense.trec"
    docs = ["dempty", *block(1)]
    run.write_text("".join(f"q1 Q0 {d} {r + 1} {100 - r} dense\n" for r, d in enumerate(docs)))
    code, _out, err = run_cli(
        capsys, "--data", str(fx.root), "--server", fake.url, "--first-stage", "run", str(run), "--top-k", "7",
        "--output", str(tmp_path / "r.json"), "--no-cache", "--no-title",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["failures"] == [] and report["per_query"]["q1"]["status"] == "reranked"
    first = docs[:7]
    reranked = [*oracle_order(fx.qrels, "q1", first[1:]), "dempty"]
    assert_close(report["per_query"]["q1"]["reranked"], expected({"q1": fx.qrels["q1"]}, {"q1": reranked}))

"""One evaluation run: dataset → first stage → rerank each query's top-k on the server → metrics before and after."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankserve.eval import metrics
from rankserve.eval.cache import RunCache, input_hash
from rankserve.eval.client import DEFAULT_MODEL, Dialect, RerankClient, RerankFailed, RetryPolicy
from rankserve.eval.data import Dataset, EvalError, load_beir
from rankserve.eval.first_stage import Run, bm25, read_trec_run


@dataclass
class EvalOptions:
    data: Path
    server: str
    first_stage: str = "bm25"  # "bm25" or "run"
    run_file: Path | None = None
    top_k: int = 100
    dialect: Dialect = Dialect.NIM
    split: str = "test"
    concurrency: int = 8
    cache: Path | None = None  # None: no cache
    model: str | None = None
    api_key: str | None = None
    use_title: bool = True
    stemmer: str | None = "english"
    stopwords: str | None = "en"
    max_queries: int | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float = 300.0
    progress: bool | None = None  # None: a progress bar only on a terminal


@dataclass
class Reranked:
    scored: dict[str, list[float]] = field(default_factory=dict)  # query id → score per candidate
    from_cache: set[str] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)  # query id → why
    requests: int = 0
    retries: int = 0
    seconds: float = 0.0


def first_stage_run(opts: EvalOptions, dataset: Dataset, query_ids: list[str]) -> tuple[Run, dict[str, Any]]:
    if opts.first_stage == "bm25":
        run = bm25(
            dataset, query_ids, opts.top_k, use_title=opts.use_title, stemmer=opts.stemmer, stopwords=opts.stopwords
        )
        return run, {"kind": "bm25", "stemmer": opts.stemmer, "stopwords": opts.stopwords}
    if opts.first_stage == "run":
        if opts.run_file is None:
            raise EvalError("--first-stage run needs a run file: --first-stage run FILE")
        run, missing = read_trec_run(opts.run_file, opts.top_k, dataset)
        return run, {"kind": "run", "path": str(opts.run_file), "docs_not_in_corpus": missing}
    raise EvalError(f"unknown first stage {opts.first_stage!r} (bm25 or run)")


EMPTY_PASSAGE_SCORE = float("-inf")


async def rerank_all(
    opts: EvalOptions, dataset: Dataset, candidates: dict[str, list[str]], cache: RunCache
) -> Reranked:
    from tqdm import tqdm

    out = Reranked()
    todo: list[tuple[str, list[str], str]] = []
    for qid, doc_ids in candidates.items():
        if not doc_ids:
            continue  # nothing to rerank (no first-stage candidate): ranked empty, scores 0 either way
        passages = [dataset.corpus[d].passage(opts.use_title) for d in doc_ids]
        digest = input_hash(dataset.queries[qid], doc_ids, passages)
        hit = cache.get(qid, digest)
        if hit is not None:
            out.scored[qid] = hit
            out.from_cache.add(qid)
        else:
            todo.append((qid, passages, digest))
    if not todo:
        return out
    limit = asyncio.Semaphore(max(1, opts.concurrency))
    started = time.perf_counter()
    bar = tqdm(
        total=len(todo), desc="reranking", unit="query", disable=None if opts.progress is None else not opts.progress
    )
    async with RerankClient(
        opts.server,
        opts.dialect,
        opts.model,
        api_key=opts.api_key,
        timeout=opts.timeout,
        retry=opts.retry,
        concurrency=opts.concurrency,
    ) as client:

        async def one(qid: str, passages: list[str], digest: str) -> None:
            async with limit:
                # Rerank APIs reject empty texts: a candidate with no text is not sent and ranks last.
                sent = [i for i, p in enumerate(passages) if p]
                try:
                    got = await client.scores(dataset.queries[qid], [passages[i] for i in sent]) if sent else []
                    scores = [EMPTY_PASSAGE_SCORE] * len(passages)
                    for i, s in zip(sent, got, strict=True):
                        scores[i] = s
                except RerankFailed as e:
                    out.failures[qid] = str(e)
                else:
                    out.scored[qid] = scores
                    cache.put(qid, digest, candidates[qid], scores)
                bar.update(1)
                if out.failures:
                    bar.set_postfix(failed=len(out.failures))

        try:
            await asyncio.gather(*(one(*item) for item in todo))
        finally:
            bar.close()
            out.requests, out.retries = client.requests, client.retries
    out.seconds = time.perf_counter() - started
    return out


def rerank_order(doc_ids: list[str], scores: list[float]) -> list[str]:
    """Best score first; equal scores keep the first stage's order."""
    order = sorted(range(len(doc_ids)), key=lambda i: (-scores[i], i))
    return [doc_ids[i] for i in order]


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    if opts.top_k < 1:
        raise EvalError("--top-k must be at least 1")
    if not opts.server.startswith(("http://", "https://")):
        raise EvalError(f"--server must be an http:// or https:// URL, got {opts.server!r}")
    dataset = load_beir(opts.data, opts.split)
    query_ids = dataset.query_ids
    if opts.max_queries is not None:
        query_ids = query_ids[: opts.max_queries]
    run, stage_info = first_stage_run(opts, dataset, query_ids)
    candidates = {q: [d for d, _ in run.get(q, [])] for q in query_ids}
    model = None if opts.dialect is Dialect.TEI else (opts.model or DEFAULT_MODEL)
    key = {"server": opts.server.rstrip("/"), "model": model, "dialect": opts.dialect.value, "top_k": opts.top_k}
    cache = RunCache(opts.cache, key)
    try:
        reranked = asyncio.run(rerank_all(opts, dataset, candidates, cache))
    finally:
        cache.close()

    reranked_lists = {
        q: rerank_order(candidates[q], reranked.scored[q]) if q in reranked.scored else list(candidates[q])
        for q in query_ids
        if q not in reranked.failures
    }
    before = metrics.per_query(dataset.qrels, candidates)
    after = metrics.per_query(dataset.qrels, reranked_lists)
    compared = [q for q in query_ids if q not in reranked.failures]
    report: dict[str, Any] = {
        "dataset": str(opts.data),
        "split": opts.split,
        "server": key["server"],
        "dialect": opts.dialect.value,
        "model": model,
        "top_k": opts.top_k,
        "passage": "title + ' ' + text" if opts.use_title else "text",
        "first_stage": stage_info,
        "queries": {
            "evaluated": len(query_ids),
            "compared": len(compared),
            "reranked": len(reranked.scored),
            "from_cache": len(reranked.from_cache),
            "no_candidates": sum(1 for q in query_ids if not candidates[q]),
            "failed": len(reranked.failures),
            "skipped": len(dataset.skipped),
        },
        "failures": [{"query_id": q, "error": e} for q, e in sorted(reranked.failures.items())],
        "skipped": [{"query_id": q, "reason": r} for q, r in sorted(dataset.skipped.items())],
        "http": {"requests": reranked.requests, "retries": reranked.retries, "seconds": round(reranked.seconds, 3)},
        "cache": {"path": str(opts.cache) if opts.cache else None, "unreadable_lines": cache.unreadable},
        # Both columns over the same queries: those reranked (a failed query is in neither; see `failures`).
        "metrics": {"first_stage": metrics.mean(before, compared), "reranked": metrics.mean(after, compared)},
        "per_query": {
            q: {
                "candidates": len(candidates[q]),
                "first_stage": before[q],
                "reranked": after.get(q),
                "status": _status(q, candidates, reranked),
            }
            for q in query_ids
        },
    }
    if reranked.failures:
        report["metrics"]["first_stage_all_queries"] = metrics.mean(before, query_ids)
    return report


def _status(qid: str, candidates: dict[str, list[str]], reranked: Reranked) -> str:
    if qid in reranked.failures:
        return "failed"
    if not candidates[qid]:
        return "no candidates"
    return "cached" if qid in reranked.from_cache else "reranked"

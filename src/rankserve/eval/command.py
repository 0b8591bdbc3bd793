"""`rankserve eval`: flags, the table on stdout, the JSON report. Imports nothing heavy until it runs, so
`rankserve serve` and `rankserve eval --help` do not load the evaluation dependencies."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

LABELS = {"recall@5": "Recall@5", "recall@10": "Recall@10", "ndcg@10": "nDCG@10", "mrr@10": "MRR@10"}
MAX_FAILURES_SHOWN = 20


class _FirstStage(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any, option: Any = None):
        if values == ["bm25"] or (len(values) == 2 and values[0] == "run"):
            setattr(ns, self.dest, values)
        else:
            parser.error("--first-stage takes `bm25` or `run FILE` (a TREC run file: qid Q0 docid rank score tag)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="BEIR-format dataset directory")
    p.add_argument("--server", required=True, help="base URL of the reranking server, e.g. http://localhost:8000")
    p.add_argument(
        "--first-stage",
        nargs="+",
        action=_FirstStage,
        default=["bm25"],
        metavar=("bm25|run", "FILE"),
        help="candidates: BM25 over the corpus (default), or a TREC run file from any retriever",
    )
    p.add_argument("--top-k", type=int, default=100, help="candidates reranked per query (default 100)")
    p.add_argument("--dialect", choices=["nim", "cohere", "tei"], default="nim", help="API to call (default nim)")
    p.add_argument("--split", default="test", help="qrels split: qrels/<split>.tsv (default test)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    p.add_argument("--output", type=Path, help="write the full report (metrics, failures, per query) as JSON")
    p.add_argument(
        "--cache",
        type=Path,
        help="JSONL of reranked scores per query, reused by a rerun (default: next to --output, "
        "FILE.cache.jsonl; none without --output)",
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write a score cache")
    p.add_argument(
        "--model", help="model id sent in the request (default nvidia/llama-nemotron-rerank-1b-v2; tei: none)"
    )
    p.add_argument("--api-key", help="sent as `Authorization: Bearer KEY`")
    p.add_argument("--no-title", action="store_true", help="passage = text only (default: title + ' ' + text)")
    p.add_argument("--stemmer", default="english", help="BM25 stemmer (PyStemmer language, or `none`)")
    p.add_argument("--stopwords", default="en", help="BM25 stopword list (bm25s language code, or `none`)")
    p.add_argument("--max-queries", type=int, help="evaluate only the first N queries of the split (a quick check)")
    p.add_argument("--retries", type=int, default=5, help="retries per query on 429/503 or a transport error")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per HTTP request (default 300)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: one on a terminal)")


def _cache_path(args: argparse.Namespace) -> Path | None:
    if args.no_cache:
        return None
    if args.cache is not None:
        return args.cache
    if args.output is not None:
        return args.output.with_name(args.output.stem + ".cache.jsonl")
    return None


def run(args: argparse.Namespace) -> int:
    missing = [m for m in ("bm25s", "pytrec_eval", "httpx", "tqdm") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"rankserve eval needs {', '.join(missing)}: pip install 'rankserve[eval]'", file=sys.stderr)
        return 2
    from rankserve.eval.client import Dialect, RetryPolicy
    from rankserve.eval.data import EvalError
    from rankserve.eval.runner import EvalOptions, run_eval

    for flag, value, low in (
        ("--top-k", args.top_k, 1),
        ("--concurrency", args.concurrency, 1),
        ("--retries", args.retries, 0),
        ("--max-queries", 1 if args.max_queries is None else args.max_queries, 1),
    ):
        if value < low:
            print(f"rankserve eval: {flag} must be at least {low}", file=sys.stderr)
            return 2
    opts = EvalOptions(
        data=args.data,
        server=args.server,
        first_stage=args.first_stage[0],
        run_file=Path(args.first_stage[1]) if len(args.first_stage) == 2 else None,
        top_k=args.top_k,
        dialect=Dialect(args.dialect),
        split=args.split,
        concurrency=args.concurrency,
        cache=_cache_path(args),
        model=args.model,
        api_key=args.api_key,
        use_title=not args.no_title,
        stemmer=None if args.stemmer.lower() == "none" else args.stemmer,
        stopwords=None if args.stopwords.lower() == "none" else args.stopwords,
        max_queries=args.max_queries,
        retry=RetryPolicy(retries=args.retries),
        timeout=args.timeout,
        progress=False if args.no_progress else None,
    )
    try:
        report = run_eval(opts)
    except EvalError as e:
        print(f"rankserve eval: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    failures = report["failures"]
    if failures:
        for f in failures[:MAX_FAILURES_SHOWN]:
            print(f"rankserve eval: query {f['query_id']} failed: {f['error']}", file=sys.stderr)
        more = len(failures) - MAX_FAILURES_SHOWN
        if more > 0:
            print(f"rankserve eval: … and {more} more failed queries (all listed in --output)", file=sys.stderr)
        return 1
    return 0


def format_table(report: dict[str, Any]) -> str:
    q = report["queries"]
    stage = report["first_stage"]
    stage_name = "bm25" if stage["kind"] == "bm25" else f"run {stage['path']}"
    model = f", {report['model']}" if report["model"] else ""
    lines = [
        f"{report['dataset']} (split {report['split']}): {q['compared']} queries compared; "
        f"first stage {stage_name}, top {report['top_k']} reranked by {report['server']} ({report['dialect']}{model})",
        f"{'metric':<10} {'first stage':>12} {'reranked':>10} {'change':>9}",
    ]
    before, after = report["metrics"]["first_stage"], report["metrics"]["reranked"]
    for key, label in LABELS.items():
        lines.append(f"{label:<10} {before[key]:>12.4f} {after[key]:>10.4f} {after[key] - before[key]:>+9.4f}")
    http = report["http"]
    lines.append(
        f"{q['reranked']} reranked ({q['from_cache']} from cache), {q['failed']} failed, "
        f"{q['no_candidates']} without candidates, {q['skipped']} skipped; "
        f"{http['requests']} HTTP requests ({http['retries']} retries) in {http['seconds']:.1f} s"
    )
    if q["failed"]:
        all_q = report["metrics"]["first_stage_all_queries"]
        lines.append(
            f"{q['failed']} queries FAILED and are in neither column (first stage over all {q['evaluated']} queries: "
            + ", ".join(f"{LABELS[k]} {v:.4f}" for k, v in all_q.items())
            + ")"
        )
    return "\n".join(lines)

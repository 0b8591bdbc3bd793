"""Recall@5, Recall@10, nDCG@10 and MRR@10 with pytrec_eval (trec_eval's definitions, as BEIR reports them):
a document is relevant when its grade is ≥ 1; nDCG's gains are the grades, discounted by log2(rank + 1), over the
ideal ordering of the query's qrels; MRR@10 is the reciprocal rank of the first relevant document in the top 10."""

from __future__ import annotations

from collections.abc import Iterable

METRICS = ("recall@5", "recall@10", "ndcg@10", "mrr@10")
_MEASURES = {"recall@5": "recall_5", "recall@10": "recall_10", "ndcg@10": "ndcg_cut_10", "mrr@10": "recip_rank"}
CUTOFF = 10


def per_query(qrels: dict[str, dict[str, int]], rankings: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Metrics of each ranked list (doc ids, best first) against the qrels. A query with no candidates scores 0."""
    import pytrec_eval

    judged = {q: qrels[q] for q in rankings}
    # trec_eval re-sorts by score (ties by doc id): give it strictly decreasing scores so our order is the order.
    run = {q: {d: float(CUTOFF - i) for i, d in enumerate(docs[:CUTOFF])} for q, docs in rankings.items() if docs}
    evaluator = pytrec_eval.RelevanceEvaluator(judged, set(_MEASURES.values()))
    scored = evaluator.evaluate(run) if run else {}
    zero = dict.fromkeys(METRICS, 0.0)
    return {q: {m: float(scored[q][_MEASURES[m]]) for m in METRICS} if q in scored else dict(zero) for q in rankings}


def mean(values: dict[str, dict[str, float]], query_ids: Iterable[str]) -> dict[str, float]:
    ids = list(query_ids)
    if not ids:
        return dict.fromkeys(METRICS, 0.0)
    return {m: sum(values[q][m] for q in ids) / len(ids) for m in METRICS}

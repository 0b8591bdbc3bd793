"""First-stage candidates: BM25 over the corpus (`bm25s`), or a TREC run file from any retriever.

A run maps each query id to its candidates, best first: `[(doc_id, score), ...]`.
"""

from __future__ import annotations

from pathlib import Path

from rankserve.eval.data import Dataset, EvalError

Run = dict[str, list[tuple[str, float]]]


def bm25(
    dataset: Dataset,
    query_ids: list[str],
    top_k: int,
    *,
    use_title: bool = True,
    stemmer: str | None = "english",
    stopwords: str | None = "en",
) -> Run:
    """BM25 (bm25s, Lucene variant, k1=1.5, b=0.75) over the passages the reranker will see. Documents that share
    no term with the query (score 0) are not candidates."""
    import bm25s

    stem = None
    if stemmer:
        try:
            import Stemmer
        except ImportError:
            raise EvalError("stemming needs PyStemmer: pip install 'rankserve[eval]' (or --stemmer none)") from None
        try:
            stem = Stemmer.Stemmer(stemmer)
        except KeyError:
            raise EvalError(f"unknown stemmer {stemmer!r}; PyStemmer has: {', '.join(Stemmer.algorithms())}") from None
    stop: str | list[str] = stopwords or []
    doc_ids = list(dataset.corpus)
    if not doc_ids:
        raise EvalError("the corpus is empty")
    passages = [dataset.corpus[d].passage(use_title) for d in doc_ids]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(passages, stopwords=stop, stemmer=stem, show_progress=False), show_progress=False)
    texts = [dataset.queries[q] for q in query_ids]
    tokens = bm25s.tokenize(texts, stopwords=stop, stemmer=stem, show_progress=False, return_ids=False)
    k = min(top_k, len(doc_ids))
    results, scores = retriever.retrieve(tokens, k=k, show_progress=False)
    run: Run = {}
    for qid, idx_row, score_row in zip(query_ids, results, scores, strict=True):
        run[qid] = [(doc_ids[int(i)], float(s)) for i, s in zip(idx_row, score_row, strict=True) if s > 0]
    return run


def read_trec_run(path: str | Path, top_k: int, dataset: Dataset) -> tuple[Run, int]:
    """A TREC run file, `qid Q0 docid rank score tag` per line (whitespace-separated). Each query's candidates are
    sorted by score descending (ties: lower rank first), as trec_eval reads them, and cut to `top_k`.
    Returns the run and how many lines named a document missing from the corpus (dropped: it has no text)."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"the run file {p} does not exist")
    rows: dict[str, list[tuple[float, int, str]]] = {}
    missing = 0
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise EvalError(f"{p}:{n}: expected `qid Q0 docid rank score tag`, got {line.strip()!r}")
            qid, _, did, rank, score, _ = parts
            try:
                entry = (float(score), int(rank), did)
            except ValueError:
                raise EvalError(f"{p}:{n}: rank must be an integer and score a number: {line.strip()!r}") from None
            if did not in dataset.corpus:
                missing += 1
                continue
            rows.setdefault(qid, []).append(entry)
    run: Run = {}
    for qid, entries in rows.items():
        seen: set[str] = set()
        ranked = []
        for score, _, did in sorted(entries, key=lambda e: (-e[0], e[1])):
            if did not in seen:
                seen.add(did)
                ranked.append((did, score))
        run[qid] = ranked[:top_k]
    return run, missing

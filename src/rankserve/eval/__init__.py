"""`rankserve eval`: measure a deployed reranker on a BEIR-format dataset.

First stage (BM25 or a TREC run file) → each query's top-k reranked over HTTP by the server under test (rankserve
or any compatible server, in the NIM, Cohere or TEI dialect) → Recall@5/@10, nDCG@10 and MRR@10 before and after.
Modules: `data` (BEIR files), `first_stage` (BM25, run files), `client` (dialects, retries), `cache` (scores per
query, so a rerun is cheap), `metrics` (pytrec_eval), `runner` (the whole run), `command` (the CLI).
"""

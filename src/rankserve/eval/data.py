"""BEIR-format datasets: `corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class EvalError(Exception):
    """A user-facing problem with the inputs of `rankserve eval` (missing file, malformed line, bad flag)."""


@dataclass(frozen=True)
class Document:
    title: str
    text: str

    def passage(self, use_title: bool = True) -> str:
        """The passage text sent to the reranker (and indexed by BM25): `title + " " + text` when there is a title."""
        if use_title and self.title.strip():
            return f"{self.title.strip()} {self.text}"
        return self.text


@dataclass
class Dataset:
    corpus: dict[str, Document]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]  # query id → doc id → relevance grade (only this split's)
    skipped: dict[str, str] = field(default_factory=dict)  # query id → why it is not evaluated

    @property
    def query_ids(self) -> list[str]:
        """The queries evaluated: in the split's qrels, with at least one relevant (grade > 0) document and a text."""
        return [q for q in self.qrels if q not in self.skipped]


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise EvalError(
            f"missing {path.name} in {path.parent} (a BEIR-format dataset has corpus.jsonl, queries.jsonl "
            "and qrels/<split>.tsv)"
        )
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{n}: not valid JSON: {e.msg}") from None
            if not isinstance(obj, dict) or "_id" not in obj:
                raise EvalError(f"{path}:{n}: expected an object with an `_id`")
            yield n, obj


def load_corpus(path: Path) -> dict[str, Document]:
    corpus: dict[str, Document] = {}
    for _, obj in _jsonl(path):
        corpus[str(obj["_id"])] = Document(title=str(obj.get("title") or ""), text=str(obj.get("text") or ""))
    return corpus


def load_queries(path: Path) -> dict[str, str]:
    return {str(obj["_id"]): str(obj.get("text") or "") for _, obj in _jsonl(path)}


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    """`query-id corpus-id score` (tab-separated, with that header line)."""
    if not path.is_file():
        splits = sorted(p.stem for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
        have = f" (this dataset has: {', '.join(splits)})" if splits else ""
        raise EvalError(f"missing {path}{have}")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (n == 1 and row[0].strip() == "query-id"):
                continue
            if len(row) != 3:
                raise EvalError(f"{path}:{n}: expected `query-id<TAB>corpus-id<TAB>score`, got {row!r}")
            qid, did, grade = row
            try:
                qrels.setdefault(qid.strip(), {})[did.strip()] = int(float(grade))
            except ValueError:
                raise EvalError(f"{path}:{n}: the score {grade!r} is not a number") from None
    return qrels


def load_beir(directory: str | Path, split: str = "test") -> Dataset:
    root = Path(directory)
    if not root.is_dir():
        raise EvalError(f"{root} is not a directory")
    corpus = load_corpus(root / "corpus.jsonl")
    queries = load_queries(root / "queries.jsonl")
    qrels = load_qrels(root / "qrels" / f"{split}.tsv")
    skipped: dict[str, str] = {}
    for qid, judged in qrels.items():
        if qid not in queries or not queries[qid].strip():
            skipped[qid] = "not in queries.jsonl (or empty text)"
        elif not any(g > 0 for g in judged.values()):
            skipped[qid] = "no relevant document in the qrels"
    if len(skipped) == len(qrels):
        raise EvalError(f"no query of the {split!r} qrels can be evaluated (none has a text and a relevant document)")
    return Dataset(corpus=corpus, queries=queries, qrels=qrels, skipped=skipped)

"""Reranked scores per query, appended to a JSONL file as each query completes, so an interrupted or repeated run
only sends the queries it has not scored yet against the same server, model, dialect and top-k.

A line is reused only if its key matches and its `input_sha256` (query text, doc ids and passage texts) is the
current one: a different first stage, corpus or `--no-title` simply misses the cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO, Any


def input_hash(query: str, doc_ids: list[str], passages: list[str]) -> str:
    h = hashlib.sha256()
    for part in (query, *doc_ids, *passages):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


class RunCache:
    def __init__(self, path: Path | None, key: dict[str, Any]) -> None:
        self.path = path
        self.key = key  # server, model, dialect, top_k
        self.entries: dict[tuple[str, str], list[float]] = {}
        self.unreadable = 0  # lines that were not valid JSON (e.g. cut short by a crash): ignored
        self._file: IO[str] | None = None
        if path is not None and path.is_file():
            self._load(path)

    def _load(self, path: Path) -> None:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if any(row.get(k) != v for k, v in self.key.items()):
                        continue
                    scores = [float(s) for s in row["scores"]]
                    if len(scores) != len(row["doc_ids"]):
                        raise ValueError("scores and doc_ids differ in length")
                    self.entries[(str(row["query_id"]), str(row["input_sha256"]))] = scores
                except (ValueError, KeyError, TypeError, AttributeError):
                    self.unreadable += 1

    def get(self, query_id: str, digest: str) -> list[float] | None:
        return self.entries.get((query_id, digest))

    def put(self, query_id: str, digest: str, doc_ids: list[str], scores: list[float]) -> None:
        self.entries[(query_id, digest)] = scores
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        row = {**self.key, "query_id": query_id, "input_sha256": digest, "doc_ids": doc_ids, "scores": scores}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

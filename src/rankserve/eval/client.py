"""The server under test, over HTTP: one request per query, in one of three public rerank dialects, with bounded
retries on overload (429/503, honouring `Retry-After`) and on transport errors."""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

import httpx

DEFAULT_MODEL = "nvidia/llama-nemotron-rerank-1b-v2"
RETRY_STATUSES = frozenset({429, 503})


class Dialect(str, Enum):
    NIM = "nim"  # POST /v1/ranking → rankings[].logit
    COHERE = "cohere"  # POST /v1/rerank → results[].relevance_score
    TEI = "tei"  # POST /rerank → [{"index", "score"}]


class RerankFailed(Exception):
    """This query could not be reranked (the message says why); the run goes on with the others."""


def build_request(dialect: Dialect, model: str | None, query: str, passages: list[str]) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) for one query and its candidate passages."""
    if dialect is Dialect.NIM:
        body: dict[str, Any] = {
            "model": model or DEFAULT_MODEL,
            "query": {"text": query},
            "passages": [{"text": p} for p in passages],
            "truncate": "END",
        }
        return "/v1/ranking", body
    if dialect is Dialect.COHERE:
        body = {
            "model": model or DEFAULT_MODEL,
            "query": query,
            "documents": passages,
            "top_n": len(passages),
            "return_documents": False,
        }
        return "/v1/rerank", body
    # TEI serves one model per process: its /rerank body has no model field.
    return "/rerank", {"query": query, "texts": passages, "truncate": True, "raw_scores": True}


def parse_scores(dialect: Dialect, body: Any, n: int) -> list[float]:
    """One score per passage, in passage order. Every index must appear exactly once with a finite score."""
    if dialect is Dialect.NIM:
        entries, key = (body.get("rankings") if isinstance(body, dict) else None), "logit"
    elif dialect is Dialect.COHERE:
        entries, key = (body.get("results") if isinstance(body, dict) else None), "relevance_score"
    else:
        entries, key = body, "score"
    if not isinstance(entries, list):
        raise RerankFailed(f"malformed {dialect.value} response: no list of results in {_snippet(body)}")
    scores: list[float | None] = [None] * n
    for entry in entries:
        try:
            index, score = int(entry["index"]), float(entry[key])
        except (TypeError, KeyError, ValueError):
            raise RerankFailed(
                f"malformed {dialect.value} result (want `index` and `{key}`): {_snippet(entry)}"
            ) from None
        if not 0 <= index < n or scores[index] is not None:
            raise RerankFailed(f"malformed {dialect.value} response: index {index} out of range or repeated")
        if not math.isfinite(score):
            raise RerankFailed(f"non-finite score {score} for passage {index}")
        scores[index] = score
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing:
        raise RerankFailed(f"the {dialect.value} response has no score for {len(missing)} of {n} passages")
    return [float(s) for s in scores if s is not None]


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP date; None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # extra attempts after the first, per query
    max_wait: float = 60.0  # cap on one wait (a Retry-After above it is cut to it)
    backoff: float = 0.5  # wait before retry n (from 0) when the server gives no Retry-After: backoff * 2**n

    def wait(self, attempt: int, header: str | None) -> float:
        hinted = retry_after(header)
        return min(self.max_wait, self.backoff * 2**attempt if hinted is None else hinted)


class RerankClient:
    """Scores one query's passages on the server; counts every HTTP request it sends."""

    def __init__(
        self,
        server: str,
        dialect: Dialect,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 300.0,
        retry: RetryPolicy | None = None,
        concurrency: int = 8,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.dialect = dialect
        self.model = model
        self.retry = retry or RetryPolicy()
        self.requests = 0
        self.retries = 0
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._http = httpx.AsyncClient(
            base_url=self.server, headers=headers, timeout=timeout, limits=limits, transport=transport
        )

    async def __aenter__(self) -> RerankClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def scores(self, query: str, passages: list[str]) -> list[float]:
        path, body = build_request(self.dialect, self.model, query, passages)
        attempts = self.retry.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            self.requests += 1
            try:
                response = await self._http.post(path, json=body)
            except httpx.TransportError as e:
                problem = f"{type(e).__name__} talking to {self.server}{path}: {e}"
                if last:
                    raise RerankFailed(f"gave up after {attempts} attempts: {problem}") from None
                await self._sleep(self.retry.wait(attempt, None))
                continue
            if response.status_code in RETRY_STATUSES and not last:
                await self._sleep(self.retry.wait(attempt, response.headers.get("retry-after")))
                continue
            if response.status_code != 200:
                problem = f"HTTP {response.status_code} from {self.server}{path}: {_error_text(response)}"
                if response.status_code in RETRY_STATUSES:
                    problem = f"gave up after {attempts} attempts: {problem}"
                raise RerankFailed(problem)
            try:
                payload = response.json()
            except ValueError:
                raise RerankFailed(f"{self.server}{path} answered 200 with a body that is not JSON") from None
            return parse_scores(self.dialect, payload, len(passages))
        raise AssertionError("unreachable")

    async def _sleep(self, seconds: float) -> None:
        self.retries += 1
        await asyncio.sleep(seconds)


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return _snippet(response.text) or "(empty body)"
    if isinstance(body, dict):
        for key in ("detail", "error", "message"):
            if isinstance(body.get(key), str) and body[key]:
                return _snippet(body[key])
    return _snippet(body)


def _snippet(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"

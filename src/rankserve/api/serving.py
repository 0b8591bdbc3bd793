"""The one serving path every dialect calls: runtime lookup, model resolution, limits, the ranker, client
disconnects and request metrics. Dialects only translate JSON to these arguments and the `RankResult` back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from typing import Any

from fastapi import Request

from rankserve.errors import ClientGone, InvalidRequest, UnknownModel
from rankserve.ranker import RankRequest, RankResult, Truncate


def app_state(request: Request) -> Any:
    return request.app.state.rs


def resolve_model(request: Request, name: str | None, *, slug: bool = False) -> str:
    """The served id for `name` (an id or alias; None → the served model), else `UnknownModel` naming them."""
    ids: list[str] = app_state(request).model_ids
    # In the hosted-style URL the slug follows `nvidia/`; a served name of our own may have no such prefix.
    if name is None or name in ids or (slug and name.removeprefix("nvidia/") in ids):
        return ids[0]
    raise UnknownModel(f"model {name!r} is not served here; this server serves {', '.join(repr(i) for i in ids)}")


def max_seq_length(request: Request) -> int:
    """Tokens per (query, passage) sequence, BOS and template included."""
    state = app_state(request)
    runtime = state.require_runtime()
    return int(runtime.encoder.max_length)


async def rank(
    request: Request,
    *,
    model: str | None,
    query: str,
    passages: Sequence[str],
    truncate: Truncate,
    top_n: int | None = None,
    field: str = "passages",
    max_passage_tokens: int | None = None,
) -> RankResult:
    """Rank `passages` for `query`. Raises `ClientGone` when the client disconnected first.

    `field` is the dialect's name for the passages, used in the max-passages error message.
    """
    state = app_state(request)
    runtime = state.require_runtime()
    resolve_model(request, model)
    limit = state.settings.max_passages
    if len(passages) > limit:
        raise InvalidRequest(f"{field}: at most {limit} {field} per request, got {len(passages)}")
    rank_request = RankRequest(
        query=query,
        passages=list(passages),
        truncate=truncate,
        top_n=top_n,
        timeout=state.settings.request_timeout_seconds,
        max_passage_tokens=max_passage_tokens,
    )
    # For the access log and the trace (read by the observability middleware when the request is done).
    scope = request.scope
    scope["rankserve.validated"] = time.perf_counter()
    scope["rankserve.passages"] = len(passages)
    if state.settings.log_request_text:
        scope["rankserve.text"] = (query, list(passages))
    state.metrics.in_flight.inc()
    try:
        result = await _unless_disconnected(request, runtime.ranker.rank(rank_request, scope.get("rankserve.timing")))
    finally:
        state.metrics.in_flight.dec()
    if result is None:
        raise ClientGone("the client disconnected")
    scope["rankserve.tokens"] = result.prompt_tokens
    state.metrics.passages.inc(len(passages))
    state.metrics.tokens.inc(result.prompt_tokens)
    return result


async def _unless_disconnected(request: Request, work: Awaitable[RankResult]) -> RankResult | None:
    """Run `work`; if the client disconnects first, cancel it (its queued sequences are dropped) → None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass

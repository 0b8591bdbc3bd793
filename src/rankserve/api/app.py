"""The app factory: settings in, a FastAPI app out. Loading and warm-up run after start-up, behind readiness."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from rankserve import __version__, logs
from rankserve.api import cohere, errors, tei
from rankserve.api.routes import router
from rankserve.errors import NotReady, ShuttingDown
from rankserve.model.checkpoint import Checkpoint
from rankserve.runtime import EngineFactory, Runtime, model_ids
from rankserve.settings import Settings
from rankserve.telemetry import Metrics, dialect_of
from rankserve.timing import RequestTiming
from rankserve.tracing import RequestRecord, Tracing

log = logging.getLogger(__name__)
access_log = logging.getLogger(logs.ACCESS_LOGGER)

ASGIApp = Callable[
    [dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[..., Awaitable[None]]], Awaitable[None]
]


@dataclass
class AppState:
    """Everything the routes need, built once per app (no module-level state)."""

    settings: Settings
    metrics: Metrics
    model_ids: list[str]
    checkpoint: Checkpoint | None = None
    engine_factory: EngineFactory | None = None
    on_fatal: Callable[[str], None] | None = None
    runtime: Runtime | None = None
    tracing: Tracing | None = None
    fatal: str | None = None
    draining: bool = False
    started_at: float = field(default_factory=time.time)

    @property
    def not_ready_reason(self) -> str | None:
        """Why readiness is 503, or None when ready."""
        if self.draining:
            return "the server is shutting down"
        if self.fatal is not None:
            return f"the engine is unavailable: {self.fatal}"
        if self.runtime is None:
            return "the model is loading"
        if not self.runtime.scheduler.healthy:
            return "the engine is failing (its last batches all failed, or the batching loop stopped)"
        return None

    @property
    def ready(self) -> bool:
        return self.not_ready_reason is None

    def require_runtime(self) -> Runtime:
        """The runtime for a new inference request. A failing engine still gets requests (it may recover);
        readiness tells load balancers to go elsewhere meanwhile."""
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self.fatal is not None:
            raise NotReady(f"the engine is unavailable: {self.fatal}")
        if self.runtime is None:
            raise NotReady("the model is still loading; retry when /v1/health/ready answers 200")
        return self.runtime

    async def load(self) -> None:
        try:
            runtime = await asyncio.to_thread(
                Runtime.load, self.settings, self.checkpoint, self.engine_factory, self.metrics.observe_batch
            )
        except Exception as e:
            self.fatal = str(e) if hasattr(e, "message") else f"{type(e).__name__}: {e}"
            log.error("could not load the model: %s", self.fatal, exc_info=not hasattr(e, "message"))
            if self.on_fatal is not None:
                self.on_fatal(self.fatal)
            return
        runtime.scheduler.start()
        self.metrics.set_engine(runtime.engine.info, self.model_ids[0])
        self.metrics.queue_tokens.set_function(lambda: runtime.scheduler.queued_tokens)
        self.metrics.queue_depth.set_function(lambda: runtime.scheduler.queued_sequences)
        self.metrics.observe_cache(runtime.ranker.cache)
        self.runtime = runtime
        log.info("ready: serving %s", ", ".join(self.model_ids))


def create_app(
    settings: Settings,
    *,
    checkpoint: Checkpoint | None = None,
    engine_factory: EngineFactory | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    state = AppState(
        settings=settings,
        metrics=Metrics(),
        model_ids=model_ids(settings),
        checkpoint=checkpoint,
        engine_factory=engine_factory,
        on_fatal=on_fatal,
        # Raises TracingUnavailable (a clear message) when configured without the `otel` extra installed.
        tracing=Tracing(settings.otlp_endpoint) if settings.otlp_endpoint else None,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(state.load(), name="load-model")
        try:
            yield
        finally:
            state.draining = True
            await loader  # a thread cannot be interrupted; loading finishes, then we close
            if state.runtime is not None:
                await state.runtime.scheduler.close()
            if state.tracing is not None:
                await asyncio.to_thread(state.tracing.shutdown)  # export the spans still buffered

    app = FastAPI(
        title="rankserve",
        version=__version__,
        description="NIM-compatible reranking for llama-nemotron-rerank-1b-v2",
        lifespan=lifespan,
    )
    app.state.rs = state
    errors.install(app)
    app.include_router(router)
    app.include_router(cohere.router)  # /v1/rerank (Cohere v1, Jina), /v2/rerank (Cohere v2)
    app.include_router(tei.router)  # /rerank (text-embeddings-inference)
    # Outermost first: path fix-up, metrics/logs/traces, then the body limit right before routing.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ObservabilityMiddleware, state=state)
    app.add_middleware(PathNormalizeMiddleware)
    if settings.cors_allow_origins:  # off by default: no browser origin may call the API
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "traceparent"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    return app


class PathNormalizeMiddleware:
    """`/v1//ranking` → `/v1/ranking` (LlamaIndex joins a base URL ending in `/` with `/ranking`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and "//" in scope["path"]:
            path = scope["path"]
            while "//" in path:
                path = path.replace("//", "/")
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


# Probes and scrapes arrive every few seconds (and readiness answers 503 all through loading): their access lines
# are logged at debug level only. They are counted in the metrics like every request.
QUIET_ROUTES = ("/v1/health/live", "/v1/health/ready", "/v1/metrics", "/metrics")


class ObservabilityMiddleware:
    """The edge every HTTP request passes: request id (`X-Request-ID` accepted and returned), metrics by route,
    dialect and status, the access log line and, when tracing is on, the request's spans.

    Inner layers leave what they learn in the ASGI scope: `rankserve.timing` (a `RequestTiming` created here and
    filled by the ranker and scheduler), and from `serving.rank`: `rankserve.validated` (when the request was
    parsed and handed to the ranker), `rankserve.passages`, `rankserve.tokens`, `rankserve.text` (only with
    `log_request_text`).
    """

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timing = RequestTiming()
        started = timing.perf_anchor  # the arrival: the timing's perf_counter anchor is taken now
        headers = scope.get("headers", [])
        incoming = next((v.decode("latin-1") for k, v in headers if k == b"x-request-id"), None)
        request_id = logs.request_id(incoming)
        scope["rankserve.timing"] = timing
        scope["rankserve.request_id"] = request_id
        status = 500
        # Lines logged on this request's path carry its id. Not reset afterwards: the server-error handler that
        # logs an unexpected exception runs outside this middleware, and each request runs in its own task
        # (its own copy of the context), so the id cannot leak into another request.
        logs.request_id_var.set(request_id)

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if scope.get("rankserve.client_gone"):
                status = 499  # nginx's code for "client closed the request"
            self._observe(scope, status, started, time.perf_counter(), timing, request_id)

    def _observe(
        self, scope: dict[str, Any], status: int, started: float, ended: float, timing: RequestTiming, rid: str
    ) -> None:
        m = self.state.metrics
        route = getattr(scope.get("route"), "path", "unmatched")
        dialect = dialect_of(route)
        m.requests.labels(route, dialect, str(status)).inc()
        m.request_seconds.labels(route, dialect).observe(ended - started)
        quiet = route in QUIET_ROUTES
        reason = scope.get("rankserve.rejection") or REJECTION_REASONS.get(status)
        if reason and not quiet:  # a readiness 503 while loading refuses no request
            m.rejections.labels(reason).inc()
        if timing.tokenize:
            m.tokenize_seconds.observe(timing.tokenize_seconds)
        passages, tokens = scope.get("rankserve.passages"), scope.get("rankserve.tokens")
        trace_id = None
        if self.state.tracing is not None and scope["method"] == "POST":
            record = RequestRecord(
                method=scope["method"],
                route=route,
                status=status,
                dialect=dialect,
                request_id=rid,
                started=started,
                ended=ended,
                timing=timing,
                validated=scope.get("rankserve.validated"),
                passages=passages,
                tokens=tokens,
            )
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
            try:
                trace_id = self.state.tracing.record(record, headers)
            except Exception:  # telemetry must never fail a request
                log.exception("could not record the request's trace")
        if not self.state.settings.access_log:
            return
        level = logging.DEBUG if quiet else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        fields: dict[str, Any] = {
            "request_id": rid,
            "method": scope["method"],
            "path": scope["path"],
            "route": route,
            "dialect": dialect,
            "status": status,
            "duration_ms": round((ended - started) * 1000, 3),
        }
        if passages is not None:
            fields["passages"] = passages
        if tokens is not None:
            fields["tokens"] = tokens
        if timing.tokenize:
            fields["tokenize_ms"] = round(timing.tokenize_seconds * 1000, 3)
        if timing.enqueued is not None:
            fields["queue_ms"] = round(timing.queue_seconds * 1000, 3)
            fields["compute_ms"] = round(timing.compute_seconds * 1000, 3)
            fields["batches"] = timing.batches
        client = scope.get("client")
        if client:
            fields["client"] = client[0]
        if trace_id is not None:
            fields["trace_id"] = trace_id
        text = scope.get("rankserve.text")  # only set with log_request_text
        if text is not None:
            fields["query"], fields["passage_texts"] = text
        access_log.log(level, "%s %s %d", scope["method"], scope["path"], status, extra=fields)


REJECTION_REASONS = {
    400: "validation",
    401: "auth",
    413: "body_too_large",
    415: "validation",
    499: "client_gone",
    422: "validation",
    429: "overload",
    503: "unavailable",
    504: "deadline",
}


class BodyLimitMiddleware:
    """Checks a request body before any parsing: JSON only (415 otherwise; a missing Content-Type is taken as
    JSON), at most `max_bytes` (413). After the buffered body, `receive` passes through, so routes can still
    wait for `http.disconnect`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if not content_type:
            # In place: outer middleware reads what routing writes into this same scope.
            scope["headers"] = [*scope.get("headers", []), (b"content-type", b"application/json")]
        elif content_type != b"application/json" and not content_type.endswith(b"+json"):
            message = f"Content-Type must be application/json, got {content_type.decode('latin-1')!r}"
            await self._reject(send, 415, message, "unsupported_media_type", scope["path"])
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject_size(send, scope["path"])
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client left mid-upload: nothing to answer
                scope["rankserve.client_gone"] = True
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._reject_size(send, scope["path"])
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject_size(self, send: Any, path: str) -> None:
        message = f"request body exceeds the limit of {self.max_bytes} bytes"
        await self._reject(send, 413, message, "body_too_large", path)

    @staticmethod
    async def _reject(send: Any, status: int, message: str, kind: str, path: str) -> None:
        body = json.dumps(errors.error_body(status, message, kind, path)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

"""OpenTelemetry traces over OTLP/HTTP, off unless an endpoint is configured (`otlp_endpoint`, or the standard
`OTEL_EXPORTER_OTLP_ENDPOINT`).

One trace per inference request (POST), built at the HTTP edge when the request is done, from the times the
layers recorded (`RequestTiming`): a server span `POST <route>` with children `validate`, `tokenize`, `queue` and
`infer`. Nothing is added to the request path while tracing is off, and the OpenTelemetry packages (the `otel`
extra) are imported only when it is on. An incoming W3C `traceparent` header makes the server span its child.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rankserve import __version__
from rankserve.errors import RankserveError
from rankserve.timing import RequestTiming

TRACES_PATH = "/v1/traces"


class TracingUnavailable(RankserveError):
    """Tracing is configured but the OpenTelemetry packages are not installed."""


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for a base URL (the OTLP spec builds it so from OTEL_EXPORTER_OTLP_ENDPOINT)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


@dataclass
class RequestRecord:
    """What the HTTP edge knows about one finished request."""

    method: str
    route: str
    status: int
    dialect: str
    request_id: str
    started: float  # perf_counter at arrival
    ended: float
    timing: RequestTiming  # its anchor converts perf_counter values to wall-clock time
    validated: float | None = None  # perf_counter when the request was parsed and handed to the ranker
    passages: int | None = None
    tokens: int | None = None


class Tracing:
    """An app's own tracer provider (never the global one) with a batching OTLP/HTTP exporter."""

    def __init__(self, endpoint: str) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as e:
            raise TracingUnavailable(
                f"tracing is configured (otlp_endpoint={endpoint!r}) but OpenTelemetry is not installed ({e.name}): "
                "pip install 'rankserve[otel]', or unset RANKSERVE_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT"
            ) from None
        attributes = {"service.version": __version__}
        if not os.environ.get("OTEL_SERVICE_NAME"):  # the standard variable wins when set
            attributes["service.name"] = "rankserve"
        self.url = traces_url(endpoint)
        # Headers, timeout, compression, sampler and batch delays follow the standard OTEL_* variables.
        self.provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=self.url)))
        self.tracer = self.provider.get_tracer("rankserve", __version__)
        self.propagator = TraceContextTextMapPropagator()

    def shutdown(self) -> None:
        """Export what is still buffered, then stop (blocking: call it off the event loop)."""
        self.provider.shutdown()

    def record(self, rec: RequestRecord, headers: Mapping[str, str]) -> str | None:
        """Emit the spans of one finished request; returns its trace id (hex), or None if not sampled."""
        from opentelemetry import trace

        t = rec.timing
        parent = self.propagator.extract(headers)
        attributes: dict[str, Any] = {
            "http.request.method": rec.method,
            "http.route": rec.route,
            "http.response.status_code": rec.status,
            "rankserve.dialect": rec.dialect,
            "rankserve.request_id": rec.request_id,
        }
        if rec.passages is not None:
            attributes["rankserve.passages"] = rec.passages
        if rec.tokens is not None:
            attributes["rankserve.tokens"] = rec.tokens
        root = self.tracer.start_span(
            f"{rec.method} {rec.route}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
            start_time=t.wall_ns(rec.started),
        )
        if not root.is_recording():  # not sampled: its children would not be either
            return None
        ctx = trace.set_span_in_context(root)

        def child(name: str, start: float, end: float, attrs: dict[str, Any] | None = None) -> None:
            span = self.tracer.start_span(name, context=ctx, start_time=t.wall_ns(start), attributes=attrs)
            span.end(end_time=t.wall_ns(max(start, end)))

        # validate: body read, JSON parsed, fields and limits checked (the whole request if it failed there).
        child("validate", rec.started, rec.validated if rec.validated is not None else rec.ended)
        if t.tokenize:
            child("tokenize", t.tokenize[0][0], t.tokenize[-1][1], {"rankserve.tokenizer_calls": len(t.tokenize)})
        if t.enqueued is not None:
            child("queue", t.enqueued, t.first_batch if t.first_batch is not None else rec.ended)
        if t.first_batch is not None and t.last_batch_end is not None:
            attrs = {"rankserve.batches": t.batches, "rankserve.compute_seconds": t.compute_seconds}
            child("infer", t.first_batch, t.last_batch_end, attrs)
        if rec.status >= 500:
            root.set_status(trace.Status(trace.StatusCode.ERROR))
        root.end(end_time=t.wall_ns(rec.ended))
        context = root.get_span_context()
        return format(context.trace_id, "032x") if context.is_valid and context.trace_flags.sampled else None

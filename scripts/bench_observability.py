"""What the observability edge costs per request: the ObservabilityMiddleware (request id, metrics, access line,
trace spans) around an ASGI app that answers at once, against the bare app, in microseconds per request.

Configurations, run interleaved (A, B, C, D, A, B, ...) and reported as medians over rounds:
  bare            the inner app alone (no middleware)
  metrics         middleware with the access log and tracing off
  metrics+log     plus the JSON access line (written to /dev/null through the real handler)
  metrics+log+otel plus spans exported over OTLP/HTTP to a loopback receiver (batch exporter thread included)
  +otel sampled 10% the same with OTEL_TRACES_SAMPLER=parentbased_traceidratio, OTEL_TRACES_SAMPLER_ARG=0.1

Usage: python scripts/bench_observability.py [--requests 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

from rankserve.api.app import AppState, ObservabilityMiddleware
from rankserve.logs import JsonFormatter
from rankserve.settings import Settings
from rankserve.telemetry import Metrics
from rankserve.timing import RequestTiming
from rankserve.tracing import Tracing

ROUTE = SimpleNamespace(path="/v1/ranking")
HEADERS = [(b"content-type", b"application/json"), (b"x-request-id", b"bench-1")]


async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Stands in for routing and the ranker: leaves what serving.rank leaves in the scope, answers 200."""
    scope["route"] = ROUTE
    timing: RequestTiming = scope.get("rankserve.timing") or RequestTiming()
    now = time.perf_counter()
    scope["rankserve.validated"] = now
    scope["rankserve.passages"] = 8
    timing.tokenized(now, now + 1e-4)
    timing.queued(now + 1e-4)
    timing.batch(now + 2e-4, 1e-3)
    scope["rankserve.tokens"] = 400
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def run(app: Any, n: int) -> float:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    started = time.perf_counter()
    for _ in range(n):
        scope = {"type": "http", "method": "POST", "path": "/v1/ranking", "headers": HEADERS, "client": ("1.2.3.4", 1)}
        await app(scope, receive, send)
    return (time.perf_counter() - started) / n * 1e6


def receiver() -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    handler = logging.StreamHandler(open("/dev/null", "w"))  # noqa: SIM115 (lives for the process)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("rankserve.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    httpd, url = receiver()

    def state(access_log: bool, tracing: bool, sample: str | None = None) -> AppState:
        settings = Settings(access_log=access_log)
        if sample is not None:  # the SDK reads its sampler from the standard variables when it is built
            os.environ |= {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": sample}
        try:
            traced = Tracing(url) if tracing else None
        finally:
            os.environ.pop("OTEL_TRACES_SAMPLER", None)
            os.environ.pop("OTEL_TRACES_SAMPLER_ARG", None)
        return AppState(settings=settings, metrics=Metrics(), model_ids=["m"], tracing=traced)

    configs = {
        "bare": inner,
        "metrics": ObservabilityMiddleware(inner, state(False, False)),
        "metrics+log": ObservabilityMiddleware(inner, state(True, False)),
        "metrics+log+otel": ObservabilityMiddleware(inner, state(True, True)),
        "+otel sampled 10%": ObservabilityMiddleware(inner, state(True, True, "0.1")),
    }
    results: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, app in configs.items():
            results[name].append(asyncio.run(run(app, args.requests)))
    bare = statistics.median(results["bare"])
    print(f"{'configuration':<18} {'µs/request (median)':>20} {'over bare':>10}   rounds")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"{name:<18} {med:>20.1f} {med - bare:>10.1f}   {', '.join(f'{v:.1f}' for v in values)}")
    for app in configs.values():
        tracing = getattr(getattr(app, "state", None), "tracing", None)
        if tracing is not None:
            tracing.shutdown()
    httpd.shutdown()


if __name__ == "__main__":
    main()

"""OpenTelemetry tracing to a real OTLP/HTTP receiver: a small loopback HTTP server in the test that accepts the
exporter's protobuf POSTs and decodes them with opentelemetry-proto. Asserts span names, parent/child structure,
the incoming `traceparent` honoured, and the spans' order in time."""

from __future__ import annotations

import gzip
import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration._cli import clean_env, start_cli
from tests.integration._support import ServerThread, running, tiny_settings

trace_service_pb2 = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER


@dataclass
class Receiver:
    url: str
    spans: list[Any] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def by_trace(self, trace_id: str) -> list[Any]:
        with self.lock:
            return [s for s in self.spans if s.trace_id.hex() == trace_id]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """An OTLP/HTTP trace receiver on a free loopback port."""
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            request = trace_service_pb2.ExportTraceServiceRequest()
            request.ParseFromString(body)
            with state.lock:
                state.paths.append(self.path)
                for resource_spans in request.resource_spans:
                    attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    state.resources.append(attrs)
                    for scope_spans in resource_spans.scope_spans:
                        state.spans.extend(scope_spans.spans)
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def attributes(span: Any) -> dict[str, Any]:
    out = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key] = getattr(a.value, kind)
    return out


def test_spans_of_a_request(tiny_checkpoint_dir: Path, receiver: Receiver) -> None:
    settings = tiny_settings(tiny_checkpoint_dir, otlp_endpoint=receiver.url)
    with running(ServerThread(settings)) as server, server.client() as client:
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01", "X-Request-ID": "traced-1"}
        body = {"query": {"text": "q"}, "passages": [{"text": "a first passage"}, {"text": "a second one"}]}
        ok = client.post("/v1/ranking", json=body, headers=headers)
        assert ok.status_code == 200, ok.text
        invalid = client.post("/v1/rerank", json={"query": "q", "documents": []}, headers={"X-Request-ID": "bad-1"})
        assert invalid.status_code == 422
        assert client.get("/v1/metrics").status_code == 200  # GETs are not traced
    # Stopping the server flushes the exporter (lifespan shutdown): everything has arrived now.

    assert set(receiver.paths) == {"/v1/traces"}
    assert receiver.resources and all(r["service.name"] == "rankserve" for r in receiver.resources)

    spans = {s.name: s for s in receiver.by_trace(TRACE_ID)}
    assert set(spans) == {"POST /v1/ranking", "validate", "tokenize", "queue", "infer"}, list(spans)
    root = spans["POST /v1/ranking"]
    # The server span continues the caller's trace; the four stages are its children.
    assert root.parent_span_id.hex() == PARENT_SPAN_ID
    assert root.kind == SERVER_KIND
    for name in ("validate", "tokenize", "queue", "infer"):
        assert spans[name].parent_span_id == root.span_id, name
        assert root.start_time_unix_nano <= spans[name].start_time_unix_nano
        assert spans[name].start_time_unix_nano <= spans[name].end_time_unix_nano <= root.end_time_unix_nano, name
    # In order: validated, then tokenized, then queued until the engine took the first batch.
    assert spans["validate"].end_time_unix_nano <= spans["tokenize"].start_time_unix_nano
    assert spans["tokenize"].end_time_unix_nano <= spans["queue"].start_time_unix_nano
    assert spans["queue"].end_time_unix_nano == spans["infer"].start_time_unix_nano
    attrs = attributes(root)
    assert attrs["http.route"] == "/v1/ranking" and attrs["http.response.status_code"] == 200
    assert attrs["rankserve.request_id"] == "traced-1" and attrs["rankserve.dialect"] == "nim"
    assert attrs["rankserve.passages"] == 2 and attrs["rankserve.tokens"] == ok.json()["usage"]["prompt_tokens"]
    assert attributes(spans["infer"])["rankserve.batches"] >= 1

    # The refused request: a trace of its own (no traceparent sent), validation only.
    others = [s for s in receiver.spans if s.trace_id.hex() != TRACE_ID]
    roots = [s for s in others if not s.parent_span_id]
    assert [s.name for s in roots] == ["POST /v1/rerank"]
    assert attributes(roots[0])["rankserve.request_id"] == "bad-1"
    assert attributes(roots[0])["http.response.status_code"] == 422
    assert sorted(s.name for s in others) == ["POST /v1/rerank", "validate"]


def test_cli_server_traces_with_the_standard_variable(
    tiny_checkpoint_dir: Path, tmp_path: Path, receiver: Receiver
) -> None:
    """`rankserve serve` with only OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_SERVICE_NAME set: spans arrive, under that
    service name, by the time SIGTERM has stopped the server; the access line names the trace."""
    env = clean_env(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_SERVICE_NAME="reranker-eu")
    server = start_cli(tiny_checkpoint_dir, tmp_path, "--log-format", "json", env=env)
    try:
        with server.client() as client:
            r = client.post("/rerank", json={"query": "q", "texts": ["a", "b"]}, headers={"X-Request-ID": "cli-1"})
            assert r.status_code == 200
    finally:
        assert server.stop() == 0, server.log()
    roots = [s for s in receiver.spans if s.name == "POST /rerank"]
    assert len(roots) == 1 and attributes(roots[0])["rankserve.request_id"] == "cli-1"
    trace_id = roots[0].trace_id.hex()
    assert {s.name for s in receiver.by_trace(trace_id)} == {"POST /rerank", "validate", "tokenize", "queue", "infer"}
    assert {r["service.name"] for r in receiver.resources} == {"reranker-eu"}
    access = [json.loads(line) for line in server.log().splitlines() if '"rankserve.access"' in line]
    assert [a["trace_id"] for a in access if a.get("request_id") == "cli-1"] == [trace_id]


def test_tracing_is_off_by_default(server: ServerThread) -> None:
    assert server.settings.otlp_endpoint is None
    assert server.state.tracing is None


def test_missing_packages_give_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from rankserve.tracing import Tracing, TracingUnavailable

    # As if the `otel` extra were not installed: importing the exporter fails.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(TracingUnavailable, match=r"pip install 'rankserve\[otel\]'"):
        Tracing("http://127.0.0.1:4318")

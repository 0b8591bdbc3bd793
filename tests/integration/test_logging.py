"""Logs of the real CLI server (`rankserve serve` as a subprocess, its stderr captured to a file, as in a container):
JSON lines by default off a terminal, one access line per request carrying the request id (accepted from and
returned in `X-Request-ID`), counts and times; no request text unless asked for; a plain-text option."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx

from tests.integration._cli import CliServer, start_cli
from tests.integration._support import ranking_body

SECRET_QUERY = "zebra-secret-query-7f3a"
SECRET_PASSAGE = "okapi-secret-passage-91c2 lives in the forest"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


def post(server: CliServer, path: str, body: Any, request_id: str | None = None) -> httpx.Response:
    headers = {"X-Request-ID": request_id} if request_id is not None else {}
    with server.client() as client:
        return client.post(path, json=body, headers=headers)


def access_lines(records: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    return [r for r in records if r["logger"] == "rankserve.access" and r.get("request_id") == request_id]


def test_json_lines_with_one_access_line_per_request(tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    server = start_cli(tiny_checkpoint_dir, tmp_path)  # default settings: stderr is a file, so JSON lines
    try:
        ok = post(server, "/v1/ranking", ranking_body(SECRET_QUERY, [SECRET_PASSAGE, "a second passage"]), "client-7")
        assert ok.status_code == 200, ok.text
        assert ok.headers["x-request-id"] == "client-7"
        cohere = post(server, "/v1/rerank", {"query": SECRET_QUERY, "documents": [SECRET_PASSAGE]})
        assert cohere.status_code == 200
        generated = cohere.headers["x-request-id"]
        assert GENERATED_ID.fullmatch(generated), generated
        # An id that is not a short plain token is not echoed (nor logged): a new one replaces it.
        hostile = post(server, "/rerank", {"query": "q", "texts": ["t"]}, "bad id\twith spaces" + "x" * 200)
        assert hostile.status_code == 200
        assert GENERATED_ID.fullmatch(hostile.headers["x-request-id"])
        invalid = post(server, "/v1/ranking", {"query": {"text": SECRET_QUERY}, "passages": []}, "client-8")
        assert invalid.status_code == 422
        assert invalid.headers["x-request-id"] == "client-8"
        with server.client() as client:
            assert client.get("/v1/health/live").headers["x-request-id"]
    finally:
        assert server.stop() == 0, server.log()

    text = server.log()
    lines = [line for line in text.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert {"ts", "level", "logger", "message"} <= set(record), record
    # uvicorn's own lines go through the same formatter; its access log is replaced by ours.
    assert any(r["logger"].startswith("uvicorn") for r in records)
    assert not any(r["logger"] == "uvicorn.access" for r in records)
    # No request text anywhere.
    assert SECRET_QUERY not in text and "okapi-secret" not in text

    [line] = access_lines(records, "client-7")
    usage = ok.json()["usage"]
    assert line["level"] == "info"
    assert (line["method"], line["path"], line["route"], line["dialect"]) == (
        "POST",
        "/v1/ranking",
        "/v1/ranking",
        "nim",
    )
    assert (line["status"], line["passages"], line["tokens"]) == (200, 2, usage["prompt_tokens"])
    assert line["client"] == "127.0.0.1"
    assert line["batches"] >= 1 and line["compute_ms"] > 0 and line["tokenize_ms"] > 0
    # The parts lie within the whole: queued and computed while the request was open.
    assert 0 <= line["queue_ms"] <= line["duration_ms"]
    assert line["compute_ms"] <= line["duration_ms"]

    [line] = access_lines(records, generated)
    assert (line["route"], line["dialect"], line["status"], line["passages"]) == ("/v1/rerank", "cohere", 200, 1)

    [line] = access_lines(records, hostile.headers["x-request-id"])
    assert line["dialect"] == "tei"
    assert "bad id" not in text

    [line] = access_lines(records, "client-8")
    assert line["status"] == 422 and "passages" not in line and "tokens" not in line

    # Probes (start_cli polled readiness through loading, 503s included) are not logged at info level.
    assert not any(r["logger"] == "rankserve.access" and r["path"].startswith("/v1/health/") for r in records)


def test_text_format_and_request_text_on_request(tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    server = start_cli(tiny_checkpoint_dir, tmp_path, "--log-format", "text", "--log-request-text", "true")
    try:
        r = post(server, "/v1/ranking", ranking_body(SECRET_QUERY, [SECRET_PASSAGE]), "text-1")
        assert r.status_code == 200
    finally:
        assert server.stop() == 0, server.log()
    lines = server.log().splitlines()
    [line] = [ln for ln in lines if "rankserve.access" in ln and "request_id=text-1" in ln]
    assert not line.startswith("{")
    assert "POST /v1/ranking 200" in line
    assert "status=200" in line and "dialect=nim" in line and "passages=1" in line
    assert re.search(r" tokens=\d+", line) and re.search(r" compute_ms=[0-9.e-]+", line)
    # Asked for: the texts are in the access line (JSON-quoted where they hold spaces).
    assert f"query={SECRET_QUERY}" in line
    assert json.dumps([SECRET_PASSAGE]) in line
    assert not any("uvicorn.access" in ln for ln in lines)

"""A hand-made corpus of hostile requests, sent as raw bytes (httpx `content=`) and, for malformed HTTP, over a raw
socket. Each is answered with a clear JSON 4xx (or a correct 200 where the input is valid); malformed HTTP gets
uvicorn's own 400 (plain text, before the app) or a closed connection. Afterwards the server is unaffected: ready,
and a known request returns the very same logits as before the corpus."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rankserve.model.checkpoint import Checkpoint
from tests.integration._support import ServerThread, assert_error, ranking_body, running, tiny_settings

BODY_LIMIT = 4 * 1024 * 1024
RANKING = "/v1/ranking"
HOSTED = "/v1/retrieval/nvidia/llama-nemotron-rerank-1b-v2/reranking"
KNOWN = ranking_body("which way should i go?", ["two roads diverged", "then took the other", "ages hence"])
GOOD = b'"passages": [{"text": "a passage"}]'
LEAKS = ("Traceback", 'File "', "site-packages", '.py"', "/work/", "/tmp/", "/home/")


@pytest.fixture(scope="module")
def hostile_server(tiny_checkpoint_dir: Path, tiny_checkpoint: Checkpoint) -> Iterator[ServerThread]:
    settings = tiny_settings(tiny_checkpoint_dir, max_body_bytes=BODY_LIMIT, warmup=False)
    with running(ServerThread(settings, checkpoint=tiny_checkpoint)) as s:
        yield s


def obj(**fields: Any) -> bytes:
    return json.dumps({**KNOWN, **fields}).encode()


def nested(depth: int) -> bytes:
    return b'{"query": {"text": "q"}, "passages": ' + b"[" * depth + b"]" * depth + b"}"


# (id, path, body bytes, content type or None for no header, expected statuses)
CORPUS: list[tuple[str, str, bytes, str | None, tuple[int, ...]]] = [
    # not JSON
    ("garbage", RANKING, b"{not json", "application/json", (400,)),
    ("trailing-garbage", RANKING, obj() + b" xyz", "application/json", (400,)),
    ("empty-body", RANKING, b"", "application/json", (400, 422)),
    ("whitespace-body", RANKING, b"   \n ", "application/json", (400, 422)),
    ("raw-nul-in-string", RANKING, b'{"query": {"text": "a\x00b"}, ' + GOOD + b"}", "application/json", (400,)),
    ("invalid-utf8", RANKING, b'{"query": {"text": "\xff\xfe\xc3"}, ' + GOOD + b"}", "application/json", (400,)),
    # RFC 8259 asks for UTF-8, but Python's json detects UTF-16/32 from the bytes: accepted, the same request.
    ("utf16-bom", RANKING, b"\xff\xfe" + json.dumps(KNOWN).encode("utf-16-le"), "application/json", (200,)),
    ("deep-arrays-100k", RANKING, nested(100_000), "application/json", (400, 422)),
    (
        "deep-objects-50k",
        RANKING,
        b'{"query": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b", " + GOOD + b"}",
        "application/json",
        (400, 422),
    ),
    (
        "int-5000-digits",
        HOSTED,
        obj(top_k=0)[:-1] + b', "top_k": ' + b"9" * 5000 + b"}",
        "application/json",
        (400, 422),
    ),
    # wrong types and nulls
    ("query-number", RANKING, obj(query=5), "application/json", (422,)),
    ("query-null", RANKING, obj(query=None), "application/json", (422,)),
    ("query-text-null", RANKING, obj(query={"text": None}), "application/json", (422,)),
    ("query-text-list", RANKING, obj(query={"text": ["a"]}), "application/json", (422,)),
    ("passages-string", RANKING, obj(passages="abc"), "application/json", (422,)),
    ("passages-null", RANKING, obj(passages=None), "application/json", (422,)),
    ("passages-numbers", RANKING, obj(passages=[1, 2]), "application/json", (422,)),
    ("passage-text-number", RANKING, obj(passages=[{"text": 5}]), "application/json", (422,)),
    ("passage-null", RANKING, obj(passages=[None]), "application/json", (422,)),
    ("truncate-null", RANKING, obj(truncate=None), "application/json", (422,)),
    ("truncate-number", RANKING, obj(truncate=1), "application/json", (422,)),
    ("sigmoid-list", RANKING, obj(sigmoid=[]), "application/json", (422,)),
    ("sigmoid-nan", RANKING, obj()[:-1] + b', "sigmoid": NaN}', "application/json", (422,)),
    ("model-object", RANKING, obj(model={"a": 1}), "application/json", (422,)),
    ("body-array", RANKING, b"[]", "application/json", (400, 422)),
    ("body-number", RANKING, b"1e999", "application/json", (400, 422)),
    # huge and odd numbers
    ("top_k-1e100", HOSTED, obj(top_k=10**100), "application/json", (200,)),
    ("top_k-minus-1e100", HOSTED, obj(top_k=-(10**100)), "application/json", (422,)),
    ("top_k-zero", HOSTED, obj(top_k=0), "application/json", (422,)),
    ("top_k-1e308", HOSTED, obj(top_k=1e308), "application/json", (422,)),
    ("top_k-infinity", HOSTED, obj()[:-1] + b', "top_k": Infinity}', "application/json", (422,)),
    ("top_k-string", HOSTED, obj(top_k="3"), "application/json", (200,)),  # pydantic's lax int: "3" is 3
    (
        "top_n-1e100",
        "/v1/rerank",
        json.dumps({"query": "q", "documents": ["a"], "top_n": 10**100}).encode(),
        None,
        (200,),
    ),
    (
        "max_tokens_per_doc-2^63",
        "/v2/rerank",
        json.dumps({"query": "q", "documents": ["a b c"], "max_tokens_per_doc": 2**63}).encode(),
        None,
        (200,),
    ),
    # strange text
    ("lone-surrogate-query", RANKING, b'{"query": {"text": "\\ud800"}, ' + GOOD + b"}", "application/json", (422,)),
    ("lone-surrogate-passage", RANKING, obj()[:-2] + b', {"text": "x\\udfff"}]}', None, (422,)),
    ("lone-surrogate-tei", "/rerank", b'{"query": "\\udc00", "texts": ["a"]}', None, (422,)),
    ("lone-surrogate-cohere", "/v1/rerank", b'{"query": "q", "documents": ["\\ud83d"]}', None, (422,)),
    ("escaped-nul", RANKING, b'{"query": {"text": "a\\u0000b"}, ' + GOOD + b"}", "application/json", (200,)),
    ("whitespace-only-text", RANKING, obj(query={"text": "   "}, passages=[{"text": " \n\t "}]), None, (200,)),
    ("bidi-and-zero-width", RANKING, obj(query={"text": "\u202e\u200b\ufeff"}), None, (200,)),
    ("empty-query", RANKING, obj(query={"text": ""}), None, (422,)),
    # sizes
    ("3MB-passage-NONE", RANKING, obj(passages=[{"text": "word " * 600_000}]), None, (422,)),
    ("3MB-passage-END", RANKING, obj(passages=[{"text": "word " * 600_000}], truncate="END"), None, (200,)),
    ("5MB-over-limit", RANKING, obj(passages=[{"text": "x" * 5_000_000}]), None, (413,)),
    ("100k-passages", RANKING, obj(passages=[{"text": "a"}] * 100_000), None, (422,)),
    ("100k-documents-tei", "/rerank", json.dumps({"query": "q", "texts": ["a"] * 100_000}).encode(), None, (422,)),
    # content types
    ("text-plain", RANKING, obj(), "text/plain", (415,)),
    ("form-urlencoded", RANKING, b"query=q&passages=p", "application/x-www-form-urlencoded", (415,)),
    ("multipart", RANKING, obj(), "multipart/form-data; boundary=x", (415,)),
    ("xml", RANKING, b"<query>q</query>", "application/xml", (415,)),
    ("content-type-garbage", RANKING, obj(), "\x01\x02;;;", (415,)),
    ("json-charset-param", RANKING, obj(), "application/json; charset=utf-8", (200,)),
    ("problem+json", RANKING, obj(), "application/problem+json", (200,)),
]


def test_duplicate_keys_take_the_last(hostile_server: ServerThread) -> None:
    # Python's json (as every JSON parser Starlette may use) keeps the last value of a repeated key: documented.
    body = b'{"query": {"text": "first"}, "query": {"text": "second"}, ' + GOOD + b"}"
    with hostile_server.client() as client:
        dup = client.post(RANKING, content=body, headers={"Content-Type": "application/json"})
        second = client.post(RANKING, json={"query": {"text": "second"}, "passages": [{"text": "a passage"}]})
    assert dup.status_code == 200, dup.text
    assert dup.json() == second.json()


def assert_no_leak(text: str) -> None:
    for word in LEAKS:
        assert word not in text, (word, text[:500])


def test_hostile_corpus(hostile_server: ServerThread) -> None:
    with hostile_server.client(timeout=60) as client:
        before = client.post(RANKING, json=KNOWN)
        assert before.status_code == 200
        outcomes: dict[str, int] = {}
        for name, path, body, content_type, expected in CORPUS:
            headers = {"Content-Type": content_type} if content_type is not None else {}
            r = client.post(path, content=body, headers=headers)
            outcomes[name] = r.status_code
            assert r.status_code in expected, (name, r.status_code, r.text[:300])
            assert_no_leak(r.text)
            if r.status_code >= 400:
                body_json = assert_error(r, r.status_code)
                assert body_json["status"] == r.status_code, (name, body_json)
                assert len(r.content) < 4096, (name, "an error body must not echo a huge input")
            else:
                assert r.headers["content-type"].startswith("application/json")
        # The server is unaffected: ready, the same logits for the same request.
        assert client.get("/v1/health/ready").status_code == 200
        after = client.post(RANKING, json=KNOWN)
    assert after.status_code == 200
    assert after.json() == before.json()
    assert len(outcomes) == len(CORPUS)


# -- malformed HTTP over a raw socket ---------------------------------------------------------------------------------


def raw_exchange(url: str, payload: bytes, *, half_close: bool = False, timeout: float = 5.0) -> bytes:
    """Send `payload` on a fresh connection; everything the server answers until it closes (or `timeout`)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server may close before reading everything (e.g. a huge header): that is an answer
            pass
        chunks: list[bytes] = []
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def status_of(raw: bytes) -> int | None:
    if not raw.startswith(b"HTTP/1."):
        return None
    return int(raw.split(b" ", 2)[1])


GOOD_BODY = json.dumps(KNOWN).encode()
MALFORMED: list[tuple[str, bytes, bool]] = [
    ("garbage-request-line", b"GARBAGE\r\n\r\n", False),
    ("binary-noise", bytes(range(256)) * 4, False),
    ("no-http-version", b"POST /v1/ranking\r\n\r\n", False),
    ("bad-content-length", b"POST /v1/ranking HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}", False),
    ("negative-content-length", b"POST /v1/ranking HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}", False),
    (
        "two-content-lengths",
        b"POST /v1/ranking HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 7\r\n\r\n{}",
        False,
    ),
    (
        "content-length-and-chunked",
        b"POST /v1/ranking HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        False,
    ),
    (
        "bad-chunk-size",
        b"POST /v1/ranking HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n",
        False,
    ),
    (
        "header-100KB",
        b"GET /v1/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        False,
    ),
    ("header-no-colon", b"GET /v1/health/live HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n", False),
    (
        "body-shorter-than-declared",
        b"POST /v1/ranking HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{}",
        True,
    ),
    (
        "content-length-1e30",
        b"POST /v1/ranking HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 30 + b"\r\n\r\n{}",
        True,
    ),
]


def test_malformed_http(hostile_server: ServerThread) -> None:
    """uvicorn answers malformed HTTP itself (400, before the app) or closes the connection; never a 5xx, never a
    hang (every exchange is bounded by the socket timeout), never a traceback."""
    answers: dict[str, int | None] = {}
    for name, payload, half_close in MALFORMED:
        started = time.monotonic()
        raw = raw_exchange(hostile_server.url, payload, half_close=half_close)
        status = status_of(raw)
        answers[name] = status
        assert time.monotonic() - started < 4, (name, "the server held the connection open")
        if name == "header-100KB":  # h11 parses a complete 100 KB header block: served (uvicorn's choice)
            assert status in (200, 400, 431, None), raw[:300]
            continue
        assert status is None or 400 <= status < 500, (name, raw[:300])
        assert_no_leak(raw.decode("latin-1"))
    # A declared Content-Length over the limit is refused from the header alone.
    assert answers["content-length-1e30"] in (400, 413, None)
    with hostile_server.client() as client:
        assert client.get("/v1/health/ready").status_code == 200
        assert client.post(RANKING, json=KNOWN).status_code == 200
    # A well-formed raw request on the same kind of connection still works.
    raw = raw_exchange(
        hostile_server.url,
        b"POST /v1/ranking HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(GOOD_BODY)}\r\n\r\n".encode()
        + GOOD_BODY,
    )
    assert status_of(raw) == 200, raw[:300]

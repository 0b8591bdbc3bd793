"""Security with an API key (a CLI subprocess, so its log can be read): bearer-token edge cases, which route groups
stay open (`--auth-public-routes health`), no stack trace, internal path or key in any error body or in the log,
the model never request-controlled, and CORS off by default."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration._cli import CliServer, clean_env, start_cli
from tests.integration._support import ServerThread, assert_error, ranking_body

KEY = "k3y-Zq8s0-d0-not-log"
GOOD = ranking_body("which way?", ["two roads", "the other"])
AUTH = {"Authorization": f"Bearer {KEY}"}
INFERENCE = [
    ("/v1/ranking", GOOD),
    ("/v1/retrieval/nvidia/llama-nemotron-rerank-1b-v2/reranking", GOOD),
    ("/v1/rerank", {"query": "q", "documents": ["a"]}),
    ("/v2/rerank", {"query": "q", "documents": ["a"]}),
    ("/rerank", {"query": "q", "texts": ["a"]}),
]
LEAKS = ("Traceback", 'File "', "site-packages", '.py"', "/work/", "/tmp/", "/home/", KEY)


@pytest.fixture(scope="module")
def keyed(tiny_checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    tmp = tmp_path_factory.mktemp("security")
    env = clean_env(tmp, RANKSERVE_API_KEY=KEY)  # from the environment: the key is not on the command line
    server = start_cli(
        tiny_checkpoint_dir,
        tmp,
        "--auth-public-routes",
        "health",
        "--max-body-bytes",
        "65536",
        "--log-level",
        "debug",
        env=env,
    )
    try:
        yield server
    finally:
        server.stop()


def no_leak(text: str) -> None:
    for word in LEAKS:
        assert word not in text, (word, text[:400])


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        f"Basic {KEY}",
        f"Token {KEY}",
        KEY,
        f"Bearer {KEY[:-1]}",  # a prefix
        f"Bearer {KEY[:-1]}X",  # one character different
        f"Bearer {KEY}x",  # one character more
        f"Bearer {KEY.upper()}",
        f"Bearer {KEY},{KEY}",
        f"Bearer\t{KEY}x",
    ],
    ids=lambda h: "absent" if h is None else repr(h.replace(KEY, "KEY"))[:40],
)
def test_wrong_or_malformed_bearer_is_a_401(keyed: CliServer, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with keyed.client() as client:
        for path, body in INFERENCE:
            r = client.post(path, json=body, headers=headers)
            assert_error(r, 401)
            assert r.headers["www-authenticate"] == "Bearer"
            no_leak(r.text)


def test_the_key_is_accepted_on_every_inference_route(keyed: CliServer) -> None:
    with keyed.client() as client:
        for path, body in INFERENCE:
            assert client.post(path, json=body, headers=AUTH).status_code == 200, path
        assert client.post("/v1/ranking", json=GOOD, headers={"Authorization": f"bearer   {KEY}"}).status_code == 200


def test_auth_public_routes_is_configurable(keyed: CliServer) -> None:
    # `--auth-public-routes health`: only health stays open; models, metrics and metadata need the key.
    with keyed.client() as client:
        for path in ("/v1/health/live", "/v1/health/ready"):
            assert client.get(path).status_code == 200, path
        for path in ("/v1/models", "/v1/metrics", "/metrics", "/v1/metadata"):
            assert_error(client.get(path), 401)
            assert_error(client.get(path, headers={"Authorization": "Bearer nope"}), 401)
            assert client.get(path, headers=AUTH).status_code == 200, path


@pytest.mark.parametrize(
    "model",
    [
        "/etc/passwd",
        "../../../../etc",
        "./checkpoints/tiny",
        "file:///etc/passwd",
        "meta-llama/Llama-3.2-1B",
        "nvidia/llama-nemotron-rerank-1b-v2/../../x",
        "nvidia/llama-nemotron-rerank-1b-v2 ",
        "",
    ],
)
def test_the_model_is_never_request_controlled(keyed: CliServer, model: str) -> None:
    with keyed.client() as client:
        before = client.get("/v1/metadata", headers=AUTH).json()
        r = client.post("/v1/ranking", json={**GOOD, "model": model}, headers=AUTH)
        assert_error(r, 404)
        no_leak(r.text.replace(model, ""))
        after = client.get("/v1/metadata", headers=AUTH).json()
    assert after["checkpoint"] == before["checkpoint"]
    assert after["id"] == before["id"]


def test_the_checkpoint_path_itself_is_not_a_model_name(keyed: CliServer, tiny_checkpoint_dir: Path) -> None:
    with keyed.client() as client:
        r = client.post("/v1/ranking", json={**GOOD, "model": str(tiny_checkpoint_dir)}, headers=AUTH)
        assert_error(r, 404)
        slug = "/v1/retrieval/nvidia/..%2F..%2Fetc%2Fpasswd/reranking"
        assert 400 <= client.post(slug, json=GOOD, headers=AUTH).status_code < 500


HOSTILE = [
    b"{not json",
    b'{"query": {"text": "\\ud800"}, "passages": [{"text": "p"}]}',
    b'{"query": {"text": "q"}, "passages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b"\xff\xfe\x00",
    json.dumps({**GOOD, "top_k": 1}).encode(),
    json.dumps({**GOOD, "passages": [{"text": "x" * 70_000}]}).encode(),  # over the 64 KiB body limit: 413
    json.dumps({**GOOD, "truncate": "MIDDLE", "model": "/etc/passwd"}).encode(),
    b"",
]


def test_no_internals_in_error_bodies_or_the_log(keyed: CliServer) -> None:
    statuses = []
    with keyed.client() as client:
        for payload in HOSTILE:
            for headers in ({}, AUTH, {"Authorization": f"Bearer {KEY}x"}):
                r = client.post("/v1/ranking", content=payload, headers={"Content-Type": "application/json", **headers})
                statuses.append(r.status_code)
                assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
                assert_error(r, r.status_code)
                no_leak(r.text)
        r = client.post("/v1/ranking", content=b"{}", headers={"Content-Type": "text/html", **AUTH})
        assert_error(r, 415)
    assert {400, 401, 413, 422} <= set(statuses), statuses
    log = keyed.log()
    assert KEY not in log, "the API key appeared in the server log"
    assert "Traceback" not in log, log[-3000:]


# -- CORS (an in-process server with default settings) -------------------------------------------------------------


def test_cors_is_off_by_default(server: ServerThread) -> None:
    origin = {"Origin": "https://evil.example"}
    with server.client() as client:
        r = client.post("/v1/ranking", json=GOOD, headers=origin)
        assert r.status_code == 200
        assert not any(k.lower().startswith("access-control-") for k in r.headers), r.headers
        r = client.get("/v1/models", headers=origin)
        assert "access-control-allow-origin" not in r.headers
        preflight = client.options(
            "/v1/ranking",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
    assert preflight.status_code >= 400  # no CORS middleware: no route answers OPTIONS
    assert not any(k.lower().startswith("access-control-") for k in preflight.headers), preflight.headers
    assert isinstance(preflight, httpx.Response)

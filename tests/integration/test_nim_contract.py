"""The NIM contract of docs nim-api.md over real HTTP: /v1/ranking, the hosted-style alias, discovery, health,
metadata, metrics, authentication and request limits."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.integration._support import (
    ALIASES,
    MODEL_ID,
    Reference,
    ServerThread,
    assert_error,
    assert_matches_reference,
    assert_sorted,
    ranking_body,
)

QUERY = "which way should i go?"
PASSAGES = [
    "Two roads diverged in a yellow wood, and sorry I could not travel both.",
    "Then took the other, as just as fair.",
    "I shall be telling this with a sigh somewhere ages and ages hence.",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "ok",
]


def post(server: ServerThread, body: Any, path: str = "/v1/ranking", **kwargs: Any) -> httpx.Response:
    with server.client() as client:
        return client.post(path, json=body, **kwargs)


# -- the ranking response ---------------------------------------------------------------------------------------


def test_response_shape_usage_and_logits(server: ServerThread, reference: Reference) -> None:
    r = post(server, ranking_body(QUERY, PASSAGES, model=MODEL_ID))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"rankings", "usage"}
    assert all(set(entry) == {"index", "logit"} for entry in body["rankings"])
    assert all(isinstance(entry["index"], int) and isinstance(entry["logit"], float) for entry in body["rankings"])
    tokens = sum(reference.length(QUERY, p) for p in PASSAGES)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert_matches_reference(body, reference.logits(QUERY, PASSAGES))


def test_single_passage(server: ServerThread, reference: Reference) -> None:
    body = post(server, ranking_body("q", ["only one"])).json()
    assert_matches_reference(body, reference.logits("q", ["only one"]))
    assert body["usage"]["total_tokens"] == reference.length("q", "only one")


def test_identical_passages_score_alike(server: ServerThread) -> None:
    same, other = "the very same passage", "a different passage altogether"
    passages = [other, same, same, other, same, same, other]
    body = post(server, ranking_body(QUERY, passages)).json()
    rankings = body["rankings"]
    by_index = {r["index"]: r["logit"] for r in rankings}
    # A repeated passage is scored once, so its copies tie exactly and come out in index order.
    assert len({by_index[i] for i in (1, 2, 4, 5)}) == 1
    assert len({by_index[i] for i in (0, 3, 6)}) == 1
    assert_sorted(rankings)
    order = [r["index"] for r in rankings]
    assert [i for i in order if i in (1, 2, 4, 5)] == [1, 2, 4, 5]
    assert [i for i in order if i in (0, 3, 6)] == [0, 3, 6]
    # usage counts every passage, repeats included
    tokens_other = post(server, ranking_body(QUERY, [other])).json()["usage"]["total_tokens"]
    tokens_same = post(server, ranking_body(QUERY, [same])).json()["usage"]["total_tokens"]
    assert body["usage"]["total_tokens"] == 3 * tokens_other + 4 * tokens_same


def test_ties_rank_the_lower_index_first(controlled_server: ServerThread) -> None:
    # Exact ties from the engine (each batch row made +1 or -1), across several batches of 2.
    controlled_server.engine.transform = lambda logits: np.where(np.arange(len(logits)) % 2 == 0, 1.0, -1.0)
    passages = [f"passage {i}" for i in range(9)]
    rankings = post(controlled_server, ranking_body(QUERY, passages)).json()["rankings"]
    assert_sorted(rankings)
    logits = [r["logit"] for r in rankings]
    assert len(set(logits)) < len(logits), "the engine wrapper should have produced ties"
    for value in set(logits):
        tied = [r["index"] for r in rankings if r["logit"] == value]
        assert tied == sorted(tied)
    controlled_server.engine.transform = np.zeros_like
    rankings = post(controlled_server, ranking_body(QUERY, passages)).json()["rankings"]
    assert [r["index"] for r in rankings] == list(range(9))


def test_default_max_passages_is_at_least_the_hosted_limit(server: ServerThread) -> None:
    passages = [f"passage number {i}" for i in range(512)]
    r = post(server, ranking_body(QUERY, passages))
    assert r.status_code == 200, r.text
    rankings = r.json()["rankings"]
    assert sorted(x["index"] for x in rankings) == list(range(512))
    assert_sorted(rankings)


# -- model names --------------------------------------------------------------------------------------------------


def test_model_omitted(server: ServerThread, reference: Reference) -> None:
    body = ranking_body(QUERY, PASSAGES[:2])
    assert "model" not in body
    r = post(server, body)
    assert r.status_code == 200, r.text
    assert_matches_reference(r.json(), reference.logits(QUERY, PASSAGES[:2]))


@pytest.mark.parametrize("model", [MODEL_ID, *ALIASES])
def test_model_aliases(server: ServerThread, model: str) -> None:
    assert post(server, ranking_body(QUERY, PASSAGES[:2], model=model)).status_code == 200


@pytest.mark.parametrize("model", ["my-reranker", MODEL_ID, ALIASES[0]])
def test_served_model_name_adds_a_name(limits_server: ServerThread, model: str) -> None:
    assert post(limits_server, ranking_body(QUERY, ["a", "b"], model=model)).status_code == 200


def test_unknown_model_names_the_served_id(server: ServerThread) -> None:
    r = post(server, ranking_body(QUERY, PASSAGES[:2], model="nvidia/nv-rerankqa-mistral-4b-v3"))
    assert 400 <= r.status_code < 500
    assert_error(r, r.status_code, MODEL_ID, "nvidia/nv-rerankqa-mistral-4b-v3")


# -- validation -----------------------------------------------------------------------------------------------------

GOOD = ranking_body(QUERY, ["a passage"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**GOOD, "query": {"text": ""}}, "query.text"),
        ({**GOOD, "passages": [{"text": "fine"}, {"text": ""}]}, "passages.1.text"),
        ({**GOOD, "passages": []}, "passages"),
        ({"passages": GOOD["passages"]}, "query"),
        ({"query": GOOD["query"]}, "passages"),
        ({**GOOD, "passages": [{"image": "x"}]}, "passages.0.text"),
        ({**GOOD, "query": "a bare string"}, "query"),
        ({**GOOD, "top_k": 3}, "top_k"),
        ({**GOOD, "truncate": "START"}, "truncate"),
        ({**GOOD, "truncate": "end"}, "truncate"),
        ({**GOOD, "model": 7}, "model"),
    ],
    ids=[
        "empty-query",
        "empty-passage",
        "no-passages",
        "missing-query",
        "missing-passages",
        "passage-without-text",
        "query-not-object",
        "unknown-field-top_k",
        "truncate-START",
        "truncate-lowercase",
        "model-not-string",
    ],
)
def test_validation_errors_name_the_field(server: ServerThread, body: dict[str, Any], field: str) -> None:
    r = post(server, body)
    assert 400 <= r.status_code < 500
    assert_error(r, 422, field)


@pytest.mark.parametrize("truncate", ["NONE", "END"])
def test_truncate_values_accepted(server: ServerThread, truncate: str) -> None:
    assert post(server, {**GOOD, "truncate": truncate}).status_code == 200


def test_extra_passage_keys_are_ignored(server: ServerThread, reference: Reference) -> None:
    passages = [{"text": "alpha beta", "image": "data:image/png;base64,AAAA", "id": 7}, {"text": "gamma", "x": None}]
    r = post(server, {"query": {"text": QUERY, "extra": 1}, "passages": passages})
    assert r.status_code == 200, r.text
    assert_matches_reference(r.json(), reference.logits(QUERY, ["alpha beta", "gamma"]))


def test_too_many_passages_names_the_limit(limits_server: ServerThread) -> None:
    assert post(limits_server, ranking_body(QUERY, ["p"] * 4)).status_code == 200
    r = post(limits_server, ranking_body(QUERY, ["p"] * 5))
    assert 400 <= r.status_code < 500
    assert_error(r, r.status_code, "4", "passages")


# -- over-length pairs (the limits server: max_seq_length 64) -----------------------------------------------------

LONG = "a long passage that keeps going and going " * 12


def test_over_length_with_truncate_none_is_a_422(limits_server: ServerThread, reference: Reference) -> None:
    n = reference.length(QUERY, LONG)
    assert n > 64
    for extra in ({}, {"truncate": "NONE"}):  # NONE is the default
        r = post(limits_server, ranking_body(QUERY, [LONG], **extra))
        body = assert_error(r, 422)
        assert body["error"] == f"Input length {n} exceeds maximum allowed token size 64"


def test_one_over_length_passage_fails_the_whole_request(limits_server: ServerThread, reference: Reference) -> None:
    r = post(limits_server, ranking_body(QUERY, ["short", LONG, "short too"], truncate="NONE"))
    body = assert_error(r, 422)
    assert body["error"] == f"Input length {reference.length(QUERY, LONG)} exceeds maximum allowed token size 64"


def test_exactly_max_length_is_accepted(limits_server: ServerThread, reference: Reference) -> None:
    passage = next(("x " * k).strip() for k in range(1, 64) if reference.length(QUERY, ("x " * k).strip()) == 64)
    r = post(limits_server, ranking_body(QUERY, [passage], truncate="NONE"))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] == 64


def test_truncate_end_scores_the_cut_pairs(limits_server: ServerThread, reference: Reference) -> None:
    passages = ["short", LONG, LONG + " with a different tail", "medium length passage " * 2]
    r = post(limits_server, ranking_body(QUERY, passages, truncate="END"))
    assert r.status_code == 200, r.text
    body = r.json()
    tokens = sum(min(reference.length(QUERY, p), 64) for p in passages)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert_matches_reference(body, reference.logits(QUERY, passages, max_length=64))
    # Cut at the same point, the two long passages are the same sequence.
    logits = {e["index"]: e["logit"] for e in body["rankings"]}
    assert logits[1] == pytest.approx(logits[2], abs=1e-6)


# -- opt-in sigmoid --------------------------------------------------------------------------------------------------


def test_sigmoid_is_opt_in(server: ServerThread) -> None:
    plain = post(server, ranking_body(QUERY, PASSAGES)).json()
    assert all("score" not in e for e in plain["rankings"])
    assert post(server, ranking_body(QUERY, PASSAGES, sigmoid=False)).json() == plain
    with_score = post(server, ranking_body(QUERY, PASSAGES, sigmoid=True)).json()
    assert [(e["index"], e["logit"]) for e in with_score["rankings"]] == [
        (e["index"], e["logit"]) for e in plain["rankings"]
    ]
    for e in with_score["rankings"]:
        assert set(e) == {"index", "logit", "score"}
        assert e["score"] == pytest.approx(1 / (1 + math.exp(-e["logit"])), rel=1e-9, abs=1e-12)
    assert with_score["usage"] == plain["usage"]


# -- routes real clients call ----------------------------------------------------------------------------------------

HOSTED = "/v1/retrieval/nvidia/llama-3_2-nv-rerankqa-1b-v2/reranking"


def test_hosted_alias_top_k(server: ServerThread) -> None:
    full = post(server, ranking_body(QUERY, PASSAGES)).json()
    everything = post(server, ranking_body(QUERY, PASSAGES), path=HOSTED)
    assert everything.status_code == 200, everything.text
    assert everything.json()["rankings"] == full["rankings"]
    # LiteLLM sends the body's model with `.` for `_`, and `top_k`.
    r = post(server, ranking_body(QUERY, PASSAGES, model=ALIASES[0], top_k=2), path=HOSTED)
    assert r.status_code == 200, r.text
    assert r.json()["rankings"] == full["rankings"][:2]
    assert r.json()["usage"] == full["usage"]  # every passage was scored


def test_hosted_alias_unknown_slug(server: ServerThread) -> None:
    r = post(server, ranking_body(QUERY, PASSAGES), path="/v1/retrieval/nvidia/some-other-model/reranking")
    assert 400 <= r.status_code < 500
    assert_error(r, r.status_code, MODEL_ID)


def test_double_slash(server: ServerThread) -> None:
    full = post(server, ranking_body(QUERY, PASSAGES)).json()
    with server.client() as client:
        r = client.post(server.url + "/v1//ranking", json=ranking_body(QUERY, PASSAGES))
    assert r.request.url.raw_path == b"/v1//ranking"
    assert r.status_code == 200, r.text
    assert r.json() == full


# -- discovery, health, metadata, metrics ----------------------------------------------------------------------------


def test_models(server: ServerThread) -> None:
    with server.client() as client:
        body = client.get("/v1/models").json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids[0] == MODEL_ID
    assert set(ALIASES) <= set(ids)
    assert all(m["object"] == "model" for m in body["data"])
    assert body["data"][0].get("root", body["data"][0]["id"]) == body["data"][0]["id"]


def test_models_lists_the_served_model_name(limits_server: ServerThread) -> None:
    with limits_server.client() as client:
        data = client.get("/v1/models").json()["data"]
    ids = [m["id"] for m in data]
    assert "my-reranker" in ids and MODEL_ID in ids
    assert data[0].get("root", data[0]["id"]) == data[0]["id"]


def test_health(server: ServerThread) -> None:
    with server.client() as client:
        live = client.get("/v1/health/live")
        ready = client.get("/v1/health/ready")
    assert live.status_code == 200
    assert live.json() == {"object": "health.response", "message": "Service is live.", "status": "live"}
    assert ready.status_code == 200
    assert ready.json() == {"object": "health.response", "message": "Service is ready.", "status": "ready"}


@pytest.mark.parametrize(("which", "max_seq", "max_passages"), [("server", 8192, 512), ("limits_server", 64, 4)])
def test_metadata(request: pytest.FixtureRequest, which: str, max_seq: int, max_passages: int) -> None:
    s: ServerThread = request.getfixturevalue(which)
    with s.client() as client:
        meta = client.get("/v1/metadata").json()
    assert MODEL_ID in (meta["id"], *meta.get("aliases", []))
    assert isinstance(meta["version"], str) and meta["version"]
    assert meta["backend"] == "torch"
    assert meta["precision"] == "float32"
    assert meta["max_seq_length"] == max_seq
    assert meta["max_passages"] == max_passages
    assert meta["random_weights"] is True


@pytest.mark.parametrize("path", ["/v1/metrics", "/metrics"])
def test_metrics_are_prometheus_text(server: ServerThread, path: str) -> None:
    from tests.integration._support import parse_metrics

    post(server, ranking_body(QUERY, PASSAGES[:2]))
    with server.client() as client:
        r = client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "rankserve_requests_total" in r.text
    samples = parse_metrics(r.text)
    want = {"route": "/v1/ranking", "dialect": "nim", "status": "200"}
    ok = [v for labels, v in samples["rankserve_requests_total"] if labels == want]
    assert ok and ok[0] >= 1


# -- authentication -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["Bearer NO_API_KEY_PROVIDED", "Bearer anything", "Basic Zm9vOmJhcg=="])
def test_auth_off_ignores_the_header(server: ServerThread, header: str) -> None:
    r = post(server, ranking_body(QUERY, ["a"]), headers={"Authorization": header})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/v1/ranking", HOSTED])
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cret-ke"}, {"Authorization": "s3cret-key"}],
    ids=["none", "wrong", "prefix", "no-scheme"],
)
def test_auth_on_rejects(auth_server: ServerThread, path: str, headers: dict[str, str]) -> None:
    r = post(auth_server, ranking_body(QUERY, ["a"]), path=path, headers=headers)
    assert_error(r, 401)


def test_auth_on_accepts_the_key(auth_server: ServerThread) -> None:
    for header in ("Bearer s3cret-key", "bearer s3cret-key"):
        r = post(auth_server, ranking_body(QUERY, ["a"]), headers={"Authorization": header})
        assert r.status_code == 200, r.text
    r = post(auth_server, ranking_body(QUERY, ["a"]), path=HOSTED, headers={"Authorization": "Bearer s3cret-key"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "path", ["/v1/models", "/v1/health/live", "/v1/health/ready", "/v1/metrics", "/metrics", "/v1/metadata"]
)
def test_auth_on_public_routes(auth_server: ServerThread, path: str) -> None:
    with auth_server.client() as client:
        assert client.get(path).status_code == 200


# -- body limits and content types (the limits server: 4096-byte bodies) ---------------------------------------------


def test_body_over_limit_with_content_length(limits_server: ServerThread) -> None:
    body = ranking_body(QUERY, ["x" * 5000])
    with limits_server.client() as client:
        r = client.post("/v1/ranking", json=body)
    assert "content-length" in {k.lower() for k in r.request.headers}
    assert_error(r, 413, "4096")


def test_body_over_limit_chunked(limits_server: ServerThread) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"query": {"text": "q"}, "passages": [{"text": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    with limits_server.client() as client:
        r = client.post("/v1/ranking", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert_error(r, 413, "4096")


def test_small_chunked_body_is_fine(limits_server: ServerThread) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"query": {"text": "q"}, '
        yield b'"passages": [{"text": "a"}, {"text": "b"}]}'

    with limits_server.client() as client:
        r = client.post("/v1/ranking", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "payload", [b"{not json", b'{"query": ', b"\xff\xfe", b"[1, 2"], ids=["garbage", "cut", "bytes", "array"]
)
def test_invalid_json_is_a_400(server: ServerThread, payload: bytes) -> None:
    with server.client() as client:
        r = client.post("/v1/ranking", content=payload, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "JSON")


@pytest.mark.parametrize("payload", [b"", b"[]", b"null", b'"text"'], ids=["empty", "list", "null", "string"])
def test_body_that_is_not_an_object_is_a_4xx(server: ServerThread, payload: bytes) -> None:
    with server.client() as client:
        r = client.post("/v1/ranking", content=payload, headers={"Content-Type": "application/json"})
    assert_error(r, (400, 422))


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_non_json_content_type_is_a_415(server: ServerThread, content_type: str) -> None:
    import json

    with server.client() as client:
        r = client.post("/v1/ranking", content=json.dumps(GOOD).encode(), headers={"Content-Type": content_type})
    assert_error(r, 415)


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8", "APPLICATION/JSON"])
def test_json_content_types(server: ServerThread, content_type: str | None) -> None:
    import json

    headers = {"Content-Type": content_type} if content_type else {}
    with server.client() as client:
        r = client.post("/v1/ranking", content=json.dumps(GOOD).encode(), headers=headers)
    if content_type is None:
        assert "content-type" not in {k.lower() for k in r.request.headers}
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/ranking", 405), ("POST", "/v1/nothing-here", 404), ("GET", "/nothing", 404)],
)
def test_other_http_errors_are_json(server: ServerThread, method: str, path: str, status: int) -> None:
    with server.client() as client:
        r = client.request(method, path, json=GOOD if method == "POST" else None)
    assert_error(r, status)


def test_cors_is_off_by_default_and_on_when_configured(
    server: ServerThread, tiny_checkpoint_dir, tiny_checkpoint
) -> None:
    from tests.integration._support import running, tiny_settings

    origin = {"Origin": "https://app.example"}
    preflight = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    with server.client() as client:
        assert "access-control-allow-origin" not in client.get("/v1/models", headers=origin).headers
        assert "access-control-allow-origin" not in client.options("/v1/ranking", headers=preflight).headers
    settings = tiny_settings(tiny_checkpoint_dir, cors_allow_origins="https://app.example", warmup=False)
    with running(ServerThread(settings, checkpoint=tiny_checkpoint)) as cors, cors.client() as client:
        r = client.options("/v1/ranking", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        other = client.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers

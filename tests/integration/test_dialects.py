"""The Cohere v1/v2, Jina and TEI rerank dialects over real HTTP: the `cohere` SDK and raw JSON, checked against
`/v1/ranking` (same order, same logits), plus validation, limits, auth and metrics on the new routes."""

from __future__ import annotations

import math
from typing import Any

import cohere
import httpx
import pytest

from tests.integration._support import MODEL_ID, Reference, ServerThread, assert_error, metric, ranking_body

QUERY = "which way should i go?"
DOCS = [
    "Two roads diverged in a yellow wood, and sorry I could not travel both.",
    "Then took the other, as just as fair.",
    "I shall be telling this with a sigh somewhere ages and ages hence.",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "ok",
]
LONG = "a long passage that keeps going and going " * 12  # over the limits server's 64 tokens
TOL = 1e-6


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def post(server: ServerThread, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    with server.client() as client:
        return client.post(path, json=body, **kwargs)


def nim(server: ServerThread, docs: list[str], truncate: str = "NONE") -> dict[str, Any]:
    r = post(server, "/v1/ranking", ranking_body(QUERY, docs, truncate=truncate))
    assert r.status_code == 200, r.text
    return r.json()


def dialect_body(path: str, docs: list[Any], **extra: Any) -> dict[str, Any]:
    if path == "/rerank":
        return {"query": QUERY, "texts": docs, **extra}
    return {"model": MODEL_ID, "query": QUERY, "documents": docs, **extra}


def scored(path: str, body: Any) -> list[tuple[int, float]]:
    """(index, score) per result, in response order (`score` or `relevance_score`, by dialect)."""
    items = body if path == "/rerank" else body["results"]
    key = "score" if path == "/rerank" else "relevance_score"
    return [(item["index"], item[key]) for item in items]


DIALECTS = ["/v1/rerank", "/v2/rerank", "/rerank"]


# -- the cohere SDK ----------------------------------------------------------------------------------------------


def test_cohere_v1_sdk(server: ServerThread) -> None:
    expected = nim(server, DOCS)["rankings"]
    co = cohere.Client(base_url=server.url, api_key="x", timeout=15)
    response = co.rerank(model=MODEL_ID, query=QUERY, documents=DOCS, top_n=3, return_documents=True)
    assert [r.index for r in response.results] == [e["index"] for e in expected[:3]]
    for r, e in zip(response.results, expected[:3], strict=True):
        assert r.relevance_score == pytest.approx(sigmoid(e["logit"]), abs=TOL)
        assert r.document is not None and r.document.text == DOCS[r.index]
    assert response.id
    assert response.meta is not None and response.meta.api_version is not None
    assert response.meta.api_version.version == "1"
    assert response.meta.billed_units is not None and response.meta.billed_units.search_units == 1
    # Document objects (Cohere v1): every field comes back.
    objects = [{"text": d, "title": f"t{i}"} for i, d in enumerate(DOCS[:2])]
    response = co.rerank(model=MODEL_ID, query=QUERY, documents=objects, return_documents=True)
    assert len(response.results) == 2
    for r in response.results:
        assert r.document is not None and r.document.text == DOCS[r.index]
        assert (r.document.model_extra or {}).get("title") == f"t{r.index}"


def test_cohere_v2_sdk(server: ServerThread) -> None:
    expected = nim(server, DOCS)["rankings"]
    co = cohere.ClientV2(base_url=server.url, api_key="x", timeout=15)
    response = co.rerank(model=MODEL_ID, query=QUERY, documents=DOCS, top_n=3)
    assert [(r.index, round(r.relevance_score, 9)) for r in response.results] == [
        (e["index"], round(sigmoid(e["logit"]), 9)) for e in expected[:3]
    ]
    assert response.meta is not None and response.meta.api_version is not None
    assert response.meta.api_version.version == "2"
    assert response.meta.billed_units is not None and response.meta.billed_units.search_units == 1
    everything = co.rerank(model=MODEL_ID, query=QUERY, documents=DOCS)
    assert [r.index for r in everything.results] == [e["index"] for e in expected]


def test_cohere_sdk_errors(server: ServerThread) -> None:
    co = cohere.ClientV2(base_url=server.url, api_key="x", timeout=15, max_retries=0)
    with pytest.raises(cohere.NotFoundError) as info:
        co.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS)
    assert MODEL_ID in info.value.body["message"]


# -- every dialect: the same ranking as /v1/ranking ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "extra", "raw"),
    [
        ("/v1/rerank", {}, False),
        ("/v2/rerank", {}, False),
        ("/rerank", {}, False),
        ("/rerank", {"raw_scores": True}, True),
    ],
    ids=["cohere-v1-jina", "cohere-v2", "tei", "tei-raw"],
)
def test_same_order_and_logits_as_nim(server: ServerThread, path: str, extra: dict[str, Any], raw: bool) -> None:
    expected = nim(server, DOCS)["rankings"]
    r = post(server, path, dialect_body(path, DOCS, **extra))
    assert r.status_code == 200, r.text
    got = scored(path, r.json())
    assert [i for i, _ in got] == [e["index"] for e in expected]
    for (_, score), e in zip(got, expected, strict=True):
        want = e["logit"] if raw else sigmoid(e["logit"])
        assert score == pytest.approx(want, abs=TOL)
        if not raw:  # and back: logit(score) recovers the logit wherever the sigmoid is not saturated
            assert 0.0 < score < 1.0
            if 1e-6 < score < 1 - 1e-6:
                assert math.log(score / (1 - score)) == pytest.approx(e["logit"], abs=1e-3)


def test_v1_rerank_shape_cohere_and_jina(server: ServerThread) -> None:
    usage = nim(server, DOCS)["usage"]
    body = post(server, "/v1/rerank", {"query": QUERY, "documents": DOCS}).json()  # model omitted: served model
    assert set(body) == {"id", "results", "meta", "model", "usage"}
    assert body["model"] == MODEL_ID
    assert body["usage"]["total_tokens"] == usage["total_tokens"]
    assert body["meta"] == {"api_version": {"version": "1"}, "billed_units": {"search_units": 1}}
    # return_documents defaults to true (Jina); false drops them (Cohere's default).
    assert all(r["document"] == {"text": DOCS[r["index"]]} for r in body["results"])
    lean = post(server, "/v1/rerank", {"query": QUERY, "documents": DOCS, "return_documents": False}).json()
    assert all(set(r) == {"index", "relevance_score"} for r in lean["results"])
    # Jina's object forms: `{"text": ...}` documents and query.
    objects = post(server, "/v1/rerank", {"query": {"text": QUERY}, "documents": [{"text": d} for d in DOCS]})
    assert [r["index"] for r in objects.json()["results"]] == [r["index"] for r in body["results"]]


def test_v2_rerank_shape(server: ServerThread) -> None:
    body = post(server, "/v2/rerank", dialect_body("/v2/rerank", DOCS)).json()
    assert set(body) == {"id", "results", "meta"}
    assert all(set(r) == {"index", "relevance_score"} for r in body["results"])
    many = post(server, "/v2/rerank", dialect_body("/v2/rerank", [f"doc {i}" for i in range(101)])).json()
    assert many["meta"]["billed_units"]["search_units"] == 2


def test_tei_shape(server: ServerThread) -> None:
    plain = post(server, "/rerank", {"query": QUERY, "texts": DOCS}).json()
    assert isinstance(plain, list) and all(set(r) == {"index", "score"} for r in plain)
    with_text = post(server, "/rerank", {"query": QUERY, "texts": DOCS, "return_text": True}).json()
    assert [(r["index"], r["text"]) for r in with_text] == [(r["index"], DOCS[r["index"]]) for r in plain]


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_top_n(server: ServerThread, path: str) -> None:
    expected = [e["index"] for e in nim(server, DOCS)["rankings"]]
    for top_n, want in ((None, expected), (2, expected[:2]), (len(DOCS), expected), (50, expected)):
        extra = {} if top_n is None else {"top_n": top_n}
        r = post(server, path, dialect_body(path, DOCS, **extra))
        assert r.status_code == 200, r.text
        assert [x["index"] for x in r.json()["results"]] == want


# -- validation: JSON 4xx naming the field --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "change", "field"),
    [
        ("/v1/rerank", {"query": ""}, "query"),
        ("/v1/rerank", {"documents": []}, "documents"),
        ("/v1/rerank", {"documents": ["fine", ""]}, "documents.1.text"),
        ("/v1/rerank", {"documents": [{"title": "no text"}]}, "documents.0.text"),
        ("/v1/rerank", {"top_n": 0}, "top_n"),
        ("/v1/rerank", {"rank_fields": ["title"]}, "rank_fields"),
        ("/v2/rerank", {"query": None}, "query"),
        ("/v2/rerank", {"documents": []}, "documents"),
        ("/v2/rerank", {"max_tokens_per_doc": 0}, "max_tokens_per_doc"),
        ("/rerank", {"query": ""}, "query"),
        ("/rerank", {"texts": []}, "texts"),
        ("/rerank", {"texts": ["a", ""]}, "texts.1"),
        ("/rerank", {"truncation_direction": "Middle"}, "truncation_direction"),
        ("/rerank", {"truncate": True, "truncation_direction": "Left"}, "truncation_direction"),
    ],
)
def test_validation_errors_name_the_field(server: ServerThread, path: str, change: dict[str, Any], field: str) -> None:
    r = post(server, path, {**dialect_body(path, DOCS[:2]), **change})
    body = assert_error(r, 422, field)
    if path == "/rerank":
        assert body["error_type"] == "validation"
    else:
        assert body["message"] == body["error"]


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_unknown_model_names_the_served_id(server: ServerThread, path: str) -> None:
    r = post(server, path, {**dialect_body(path, DOCS[:2]), "model": "rerank-english-v3.0"})
    assert_error(r, 404, MODEL_ID, "rerank-english-v3.0")


@pytest.mark.parametrize("model", ["my-reranker", "nvidia/llama-3_2-nv-rerankqa-1b-v2"])
def test_model_aliases(limits_server: ServerThread, model: str) -> None:
    for path in ("/v1/rerank", "/v2/rerank"):
        r = post(limits_server, path, {**dialect_body(path, ["a", "b"]), "model": model})
        assert r.status_code == 200, r.text


# -- length and count limits (the limits server: 64 tokens, 4 passages, 4 KiB bodies) -------------------------------


def test_long_documents_are_cut_like_nim_end(limits_server: ServerThread) -> None:
    docs = ["short", LONG, "medium length passage " * 2]
    expected = nim(limits_server, docs, truncate="END")["rankings"]
    for path, extra in (("/v1/rerank", {}), ("/v2/rerank", {}), ("/v2/rerank", {"max_tokens_per_doc": 64})):
        r = post(limits_server, path, dialect_body(path, docs, **extra))
        assert r.status_code == 200, r.text
        got = scored(path, r.json())
        assert [i for i, _ in got] == [e["index"] for e in expected]
        assert all(s == pytest.approx(sigmoid(e["logit"]), abs=TOL) for (_, s), e in zip(got, expected, strict=True))
    r = post(limits_server, "/rerank", {"query": QUERY, "texts": docs, "truncate": True, "raw_scores": True})
    assert r.status_code == 200, r.text
    assert [(x["index"], pytest.approx(x["score"], abs=TOL)) for x in r.json()] == [
        (e["index"], e["logit"]) for e in expected
    ]


def test_max_tokens_per_doc_cuts_each_document_to_its_first_tokens(server: ServerThread, reference: Reference) -> None:
    docs = [LONG, "tiny", "a medium passage about roads and choices, somewhat longer than the cut"]
    n = 7
    cut = []
    for doc in docs:  # independently: the text of the document's first n tokens, tokenized on its own
        enc = reference.tokenizer.encode(doc, add_special_tokens=False)
        cut.append(doc if len(enc.ids) <= n else doc[: enc.offsets[n - 1][1]])
    expected = nim(server, cut)["rankings"]
    r = post(server, "/v2/rerank", dialect_body("/v2/rerank", docs, max_tokens_per_doc=n))
    assert r.status_code == 200, r.text
    got = scored("/v2/rerank", r.json())
    assert [i for i, _ in got] == [e["index"] for e in expected]
    assert all(s == pytest.approx(sigmoid(e["logit"]), abs=TOL) for (_, s), e in zip(got, expected, strict=True))
    uncut = scored("/v2/rerank", post(server, "/v2/rerank", dialect_body("/v2/rerank", docs)).json())
    assert dict(uncut)[0] != pytest.approx(dict(got)[0], abs=TOL)  # the cut changed the long document's score


def test_tei_over_length_without_truncate_is_a_413(limits_server: ServerThread) -> None:
    before = limits_server.metrics()
    for extra in ({}, {"truncate": False}, {"truncate": False, "truncation_direction": "Left"}):
        r = post(limits_server, "/rerank", {"query": QUERY, "texts": ["short", LONG], **extra})
        body = assert_error(r, 413, "exceeds maximum allowed token size 64")
        assert body["error_type"] == "validation"
    after = limits_server.metrics()
    grew = metric(after, "rankserve_rejections_total", reason="validation") - metric(
        before, "rankserve_rejections_total", reason="validation"
    )
    assert grew >= 3
    assert metric(after, "rankserve_rejections_total", reason="body_too_large") == metric(
        before, "rankserve_rejections_total", reason="body_too_large"
    )


@pytest.mark.parametrize(
    ("path", "field"), [("/v1/rerank", "documents"), ("/v2/rerank", "documents"), ("/rerank", "texts")]
)
def test_too_many_documents_names_the_limit(limits_server: ServerThread, path: str, field: str) -> None:
    assert post(limits_server, path, dialect_body(path, ["d"] * 4)).status_code == 200
    assert_error(post(limits_server, path, dialect_body(path, ["d"] * 5)), 422, field, "4")


@pytest.mark.parametrize("path", DIALECTS)
def test_body_limit_applies(limits_server: ServerThread, path: str) -> None:
    body = assert_error(post(limits_server, path, dialect_body(path, ["x" * 5000])), 413, "4096")
    assert ("error_type" in body) == (path == "/rerank")


# -- auth and metrics ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DIALECTS)
def test_auth_applies(auth_server: ServerThread, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert_error(post(auth_server, path, dialect_body(path, ["a"]), headers=headers), 401)
    r = post(auth_server, path, dialect_body(path, ["a"]), headers={"Authorization": "Bearer s3cret-key"})
    assert r.status_code == 200, r.text


def test_auth_with_the_cohere_sdk(auth_server: ServerThread) -> None:
    with pytest.raises(cohere.UnauthorizedError):
        cohere.ClientV2(base_url=auth_server.url, api_key="wrong", max_retries=0).rerank(
            model=MODEL_ID, query=QUERY, documents=["a"]
        )
    ok = cohere.ClientV2(base_url=auth_server.url, api_key="s3cret-key").rerank(
        model=MODEL_ID, query=QUERY, documents=["a", "b"]
    )
    assert len(ok.results) == 2


def test_metrics_count_the_dialect_routes(server: ServerThread) -> None:
    for path in DIALECTS:
        assert post(server, path, dialect_body(path, DOCS[:2])).status_code == 200
    samples = server.metrics()
    for path in DIALECTS:
        assert metric(samples, "rankserve_requests_total", route=path, status="200") >= 1


# -- the NIM route's WINDOW extension -------------------------------------------------------------------------------


def test_nim_truncate_window_is_accepted(limits_server: ServerThread) -> None:
    short = nim(limits_server, DOCS[:3])
    r = post(limits_server, "/v1/ranking", ranking_body(QUERY, DOCS[:3], truncate="WINDOW"))
    assert r.status_code == 200, r.text
    assert r.json()["rankings"] == short["rankings"]  # pairs that fit: one window each, the same logits
    r = post(limits_server, "/v1/ranking", ranking_body(QUERY, [LONG], truncate="WINDOW"))
    assert r.status_code == 200, r.text

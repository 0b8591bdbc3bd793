"""Schemathesis against the app's own OpenAPI schema, over real HTTP: every operation, schema-valid (positive) and
schema-invalid (negative) requests, a bounded and derandomized number of examples each.

Checks: schemathesis's defaults (no 5xx, status code, content type, response headers and response body conform to
the declared schema — error bodies included: the inference routes declare `ErrorBody` for their 4xx/5xx —, and
negative data rejected) minus `positive_data_acceptance`: a schema-valid request may still be refused by a rule the
schema cannot state (`max_passages` and the length limit are server settings, an unknown `model` is a 404, TEI's
`truncation_direction: "Left"` with `truncate: true` and Cohere's `rank_fields` other than `text` are 422s: all
documented in docs/api.md). On top: every error is our JSON error body. The long run is `scripts/fuzz_soak.py`.
"""

from __future__ import annotations

from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from tests.integration._support import MODEL_ID, ServerThread  # noqa: E402

MAX_EXAMPLES = 25
OPERATIONS = [
    ("POST", "/v1/ranking"),
    ("POST", "/v1/retrieval/nvidia/{slug}/reranking"),
    ("GET", "/v1/models"),
    ("GET", "/v1/health/live"),
    ("GET", "/v1/health/ready"),
    ("GET", "/v1/metadata"),
    ("GET", "/v1/metrics"),
    ("POST", "/v1/rerank"),
    ("POST", "/v2/rerank"),
    ("POST", "/rerank"),
]


@pytest.fixture(scope="module")
def schema(server: ServerThread) -> Any:
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def test_every_route_is_fuzzed(schema: Any) -> None:
    declared = {(method.upper(), path) for path, item in schema.raw_schema["paths"].items() for method in item}
    assert declared == set(OPERATIONS), "a route was added or removed: update OPERATIONS"


def fuzz(server: ServerThread, operation: Any, mode: GenerationMode, **fixed: Any) -> dict[int, int]:
    """Run up to MAX_EXAMPLES generated requests against `operation`; status code → count."""
    statuses: dict[int, int] = {}

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    def run(case: Any) -> None:
        response = case.call(base_url=server.url, timeout=30)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(response, excluded_checks=[positive_data_acceptance])
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            content_type = response.headers["content-type"]  # schemathesis: a list of values
            assert [v.split(";")[0] for v in content_type] == ["application/json"], content_type
            body = response.json()
            assert body["status"] == response.status_code and body["error"] and body["detail"], body
            assert "Traceback" not in response.text

    try:
        run()
    except Unsatisfiable:  # negative mode on an operation without parameters or body: nothing to break
        assert mode is GenerationMode.NEGATIVE and not statuses
    return statuses


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_schema_fuzz(server: ServerThread, schema: Any, method: str, path: str, mode: GenerationMode) -> None:
    statuses = fuzz(server, schema[path][method], mode)
    if method == "POST" and mode is GenerationMode.NEGATIVE:
        assert statuses and all(400 <= s < 500 for s in statuses), statuses  # invalid input: only 4xx
    with server.client() as client:
        assert client.get("/v1/health/ready").status_code == 200


def test_schema_fuzz_hosted_route_with_a_served_slug(server: ServerThread, schema: Any) -> None:
    # Generated slugs are all unknown models (404): fix the slug so the body fuzzing reaches the ranker.
    slug = MODEL_ID.removeprefix("nvidia/")
    operation = schema["/v1/retrieval/nvidia/{slug}/reranking"]["POST"]
    statuses = fuzz(server, operation, GenerationMode.POSITIVE, path_parameters={"slug": slug})
    assert statuses.get(200, 0) > 0, statuses

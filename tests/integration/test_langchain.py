"""LangChain's NVIDIA NIM reranker, unmodified, against our server."""

from __future__ import annotations

import asyncio
import warnings

import httpx
import pytest
from langchain_core.documents import Document
from langchain_nvidia_ai_endpoints import NVIDIARerank

from tests.integration._support import MODEL_ID, ServerThread, ranking_body

QUERY = "What is the GPU memory bandwidth of H100 SXM?"
PASSAGES = [
    "The Hopper GPU is paired with the Grace CPU using NVIDIA's ultra-fast chip-to-chip interconnect.",
    "A100 provides up to 20X higher performance over the prior generation.",
    "Accelerated servers with H100 deliver 3 terabytes per second (TB/s) of memory bandwidth per GPU.",
    "The weather today is sunny.",
    "NVLink and NVSwitch scale GPU memory bandwidth across servers.",
    "Bananas are yellow.",
]


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing here may try to leave the machine; the client only reports usage for NVIDIA-hosted URLs anyway.
    monkeypatch.delenv("NVIDIA_API_KEY", raising=False)


def our_top3(server: ServerThread) -> list[tuple[int, float]]:
    with server.client() as client:
        r = client.post("/v1/ranking", json=ranking_body(QUERY, PASSAGES, model=MODEL_ID))
    r.raise_for_status()
    return [(e["index"], e["logit"]) for e in r.json()["rankings"][:3]]


def check(docs: list[Document], expected: list[tuple[int, float]]) -> None:
    assert len(docs) == 3
    got = [(PASSAGES.index(d.page_content), d.metadata["relevance_score"]) for d in docs]
    assert [i for i, _ in got] == [i for i, _ in expected]
    for (_, score), (_, logit) in zip(got, expected, strict=True):
        assert score == pytest.approx(logit, abs=1e-6)
    assert all(d.metadata["source"] == "test" for d in docs)


def test_compress_documents(server: ServerThread) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. about models it does not know
        ranker = NVIDIARerank(base_url=f"{server.url}/v1", model=MODEL_ID, top_n=3)
    docs = ranker.compress_documents(
        documents=[Document(page_content=p, metadata={"source": "test"}) for p in PASSAGES], query=QUERY
    )
    check(list(docs), our_top3(server))


def test_acompress_documents(server: ServerThread) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranker = NVIDIARerank(base_url=f"{server.url}/v1/", model=MODEL_ID, top_n=3)
    docs = asyncio.run(
        asyncio.wait_for(
            ranker.acompress_documents(
                documents=[Document(page_content=p, metadata={"source": "test"}) for p in PASSAGES], query=QUERY
            ),
            30,
        )
    )
    check(list(docs), our_top3(server))


def test_default_model_from_v1_models(server: ServerThread) -> None:
    """No model given: the client picks the first /v1/models entry whose root is its id."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranker = NVIDIARerank(base_url=f"{server.url}/v1", top_n=3)
    assert ranker.model == MODEL_ID
    docs = ranker.compress_documents(
        documents=[Document(page_content=p, metadata={"source": "test"}) for p in PASSAGES], query=QUERY
    )
    check(list(docs), our_top3(server))


def test_api_key(auth_server: ServerThread) -> None:
    docs = [Document(page_content=p, metadata={"source": "test"}) for p in PASSAGES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good = NVIDIARerank(base_url=f"{auth_server.url}/v1", model=MODEL_ID, top_n=3, api_key="s3cret-key")
        bad = NVIDIARerank(base_url=f"{auth_server.url}/v1", model=MODEL_ID, top_n=3, api_key="wrong")
    assert len(good.compress_documents(documents=docs, query=QUERY)) == 3
    with pytest.raises(Exception) as info:
        bad.compress_documents(documents=docs, query=QUERY)
    # The client builds its message from our error body (`status`, `error`/`detail`).
    assert "401" in str(info.value)
    assert "a valid API key is required" in str(info.value)
    assert not isinstance(info.value, httpx.TimeoutException)

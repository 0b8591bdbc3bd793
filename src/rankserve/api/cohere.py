"""The Cohere rerank dialects (v1, which Jina's API shares, and v2): schemas and routes.

Thin translations onto `serving.rank`: documents → passages, `top_n` → the ranker's top-n, and each ranking back
as `relevance_score` = sigmoid(logit). Long documents are cut at the end (Cohere truncates, it never rejects).
"""

from __future__ import annotations

import math
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from rankserve.api import serving
from rankserve.api.auth import auth
from rankserve.api.schemas import ERROR_RESPONSES, Usage
from rankserve.errors import InvalidRequest
from rankserve.ranker import RankResult, Truncate

V1_PATH = "/v1/rerank"
V2_PATH = "/v2/rerank"
DOCUMENTS_PER_SEARCH_UNIT = 100  # Cohere bills one search unit per query with up to 100 documents

router = APIRouter(dependencies=[auth(None)], responses=ERROR_RESPONSES)


def _text_object(value: Any) -> Any:
    """A bare string is shorthand for `{"text": string}` (both are accepted wherever a document is)."""
    return {"text": value} if isinstance(value, str) else value


def _text_of(value: Any) -> Any:
    """A query may come as `{"text": string}` (Jina's object form): take its text."""
    return value["text"] if isinstance(value, dict) and "text" in value else value


class Document(BaseModel):
    # Cohere v1 echoes every field of a document object back; keep them all.
    model_config = ConfigDict(extra="allow")
    text: str = Field(min_length=1)


DocumentItem = Annotated[Document, BeforeValidator(_text_object)]
Query = Annotated[str, BeforeValidator(_text_of), Field(min_length=1)]


class RerankRequest(BaseModel):
    """Fields both Cohere versions share. Unknown fields are ignored (clients send their own extras)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="served model id or alias; omitted: the served model")
    query: Query
    documents: list[DocumentItem] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1, description="return only the best n; omitted or above the count: all")


class RerankV1Request(RerankRequest):
    """Cohere v1 and Jina. `return_documents` defaults to true (Jina's default; Cohere's is false)."""

    return_documents: bool | None = Field(None, description="echo each document (default true)")
    rank_fields: list[str] | None = Field(None, description="only `['text']` is supported")
    max_chunks_per_doc: int | None = Field(
        None,
        ge=1,
        description="accepted and ignored: long documents are cut (windowed with long_documents=window)",
    )


class RerankV2Request(RerankRequest):
    max_tokens_per_doc: int | None = Field(
        None, ge=1, description="each document is cut to its first N tokens before scoring (then END truncation)"
    )


class ResultDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: ResultDocument | None = None


class ApiVersion(BaseModel):
    version: str


class BilledUnits(BaseModel):
    search_units: int


class Meta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits


class RerankV1Response(BaseModel):
    id: str
    results: list[RerankResult]
    meta: Meta
    model: str  # Jina
    usage: Usage  # Jina reads `total_tokens`


class RerankV2Response(BaseModel):
    id: str
    results: list[RerankResult]
    meta: Meta


@router.post(V1_PATH, response_model=RerankV1Response, response_model_exclude_none=True)
async def rerank_v1(body: RerankV1Request, request: Request) -> Any:
    if body.rank_fields not in (None, ["text"]):
        raise InvalidRequest(f"rank_fields: only ['text'] is supported, got {body.rank_fields!r}")
    result = await _rank(request, body, Truncate.END)
    echo = body.return_documents is not False
    results = [
        RerankResult(
            index=r.index,
            relevance_score=r.probability,
            document=ResultDocument(**body.documents[r.index].model_dump()) if echo else None,
        )
        for r in result.rankings
    ]
    return RerankV1Response(
        id=str(uuid.uuid4()),
        results=results,
        meta=_meta("1", len(body.documents)),
        model=serving.resolve_model(request, body.model),
        usage=Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
    )


@router.post(V2_PATH, response_model=RerankV2Response, response_model_exclude_none=True)
async def rerank_v2(body: RerankV2Request, request: Request) -> Any:
    result = await _rank(request, body, Truncate.END, max_passage_tokens=body.max_tokens_per_doc)
    return RerankV2Response(
        id=str(uuid.uuid4()),
        results=[RerankResult(index=r.index, relevance_score=r.probability) for r in result.rankings],
        meta=_meta("2", len(body.documents)),
    )


async def _rank(
    request: Request, body: RerankRequest, truncate: Truncate, max_passage_tokens: int | None = None
) -> RankResult:
    return await serving.rank(
        request,
        model=body.model,
        query=body.query,
        passages=[d.text for d in body.documents],
        truncate=truncate,
        top_n=body.top_n,
        field="documents",
        max_passage_tokens=max_passage_tokens,
    )


def _meta(version: str, documents: int) -> Meta:
    units = max(1, math.ceil(documents / DOCUMENTS_PER_SEARCH_UNIT))
    return Meta(api_version=ApiVersion(version=version), billed_units=BilledUnits(search_units=units))

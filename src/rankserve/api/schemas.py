"""The NIM `/v1/ranking` wire format (request and response bodies)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TextItem(BaseModel):
    # Clients add keys the text model does not use (LangChain sends `image` for VLM rerankers): ignored.
    model_config = ConfigDict(extra="ignore")
    text: str = Field(min_length=1)


class RankingRequest(BaseModel):
    # The NIM rejects unknown top-level fields; so do we, naming the field.
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="served model id or alias; omitted: the served model")
    query: TextItem
    passages: list[TextItem] = Field(min_length=1)
    truncate: Literal["NONE", "END", "WINDOW"] = Field(
        "NONE",
        description="NONE: over-length pairs are a 422; END: cut; WINDOW (rankserve extension): overlapping windows, "
        "max logit",
    )
    # rankserve extension (the NIM does not know it): add `score` = sigmoid(logit) to each ranking.
    sigmoid: bool = Field(False, description="rankserve extension: also return sigmoid(logit) as `score`")


class HostedRankingRequest(RankingRequest):
    """NVIDIA's hosted-style route, where LiteLLM may send `top_k` (return only the best k)."""

    top_k: int | None = Field(None, ge=1)


class RankingEntry(BaseModel):
    index: int
    logit: float
    score: float | None = Field(None, description="sigmoid(logit), only when the request set `sigmoid`")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RankingResponse(BaseModel):
    rankings: list[RankingEntry]
    usage: Usage


class ErrorBody(BaseModel):
    """Every error response (docs/api.md, "Errors"). Dialect routes add their clients' key (`message`,
    `error_type`)."""

    model_config = ConfigDict(extra="allow")
    error: str
    detail: str
    status: int
    type: str


# Declared in the OpenAPI schema of the inference routes (replacing FastAPI's default 422 body, which is not ours).
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "the body is not valid JSON",
        401: "API key missing or wrong",
        404: "unknown model",
        413: "body over the size limit (TEI: also an over-length pair)",
        415: "Content-Type is not JSON",
        422: "a field is missing or invalid",
        429: "the queue is full (Retry-After)",
        500: "the engine failed on this request's batch",
        503: "loading, broken or shutting down (Retry-After)",
        504: "the request's deadline passed",
    }.items()
}

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

"""Hugging Face text-embeddings-inference's `/rerank` dialect: schemas and the route.

A thin translation onto `serving.rank`: `texts` → passages, `truncate` → END or NONE, and a bare array of
`{index, score, text?}` back, where `score` is sigmoid(logit), or the raw logit with `raw_scores`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rankserve.api import serving
from rankserve.api.auth import auth
from rankserve.api.schemas import ERROR_RESPONSES
from rankserve.errors import InvalidRequest
from rankserve.ranker import Truncate

PATH = "/rerank"

router = APIRouter(dependencies=[auth(None)], responses=ERROR_RESPONSES)


class TeiRerankRequest(BaseModel):
    # TEI ignores fields it does not know; so do we.
    model_config = ConfigDict(extra="ignore")

    query: str = Field(min_length=1)
    texts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    truncate: bool | None = Field(None, description="true: cut over-length pairs at the end; false/omitted: 413")
    truncation_direction: Literal["Right", "Left"] = Field("Right", description="only Right is supported")
    raw_scores: bool = Field(False, description="score = the raw logit instead of sigmoid(logit)")
    return_text: bool = Field(False, description="echo each text")

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _capitalize(cls, value: Any) -> Any:
        # TEI spells them "Right"/"Left"; some clients send them lower-case.
        return value.capitalize() if isinstance(value, str) else value


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None


@router.post(PATH, response_model=list[TeiRank], response_model_exclude_none=True)
async def rerank(body: TeiRerankRequest, request: Request) -> Any:
    truncate = Truncate.END if body.truncate else Truncate.NONE
    if truncate is Truncate.END and body.truncation_direction == "Left":
        raise InvalidRequest(
            "truncation_direction: 'Left' is not supported: cutting the start of a pair would drop the query; "
            "use 'Right' (the passage's tail is cut)"
        )
    result = await serving.rank(
        request, model=None, query=body.query, passages=body.texts, truncate=truncate, field="texts"
    )
    return [
        TeiRank(
            index=r.index,
            score=r.logit if body.raw_scores else r.probability,
            text=body.texts[r.index] if body.return_text else None,
        )
        for r in result.rankings
    ]

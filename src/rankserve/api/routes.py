"""HTTP routes: NIM ranking (and its hosted-style alias), discovery, health, metadata and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from rankserve import __version__
from rankserve.api import serving
from rankserve.api.auth import auth
from rankserve.api.schemas import (
    ERROR_RESPONSES,
    HostedRankingRequest,
    RankingEntry,
    RankingRequest,
    RankingResponse,
    Usage,
)
from rankserve.ranker import Truncate

router = APIRouter()


# -- ranking -------------------------------------------------------------------------------------------------


@router.post(
    "/v1/ranking",
    response_model=RankingResponse,
    response_model_exclude_none=True,
    dependencies=[auth(None)],
    responses=ERROR_RESPONSES,
)
async def ranking(body: RankingRequest, request: Request) -> Any:
    return await _rank(request, body, top_n=None)


@router.post(
    "/v1/retrieval/nvidia/{slug}/reranking",
    response_model=RankingResponse,
    response_model_exclude_none=True,
    dependencies=[auth(None)],
    responses=ERROR_RESPONSES,
)
async def hosted_ranking(slug: str, body: HostedRankingRequest, request: Request) -> Any:
    serving.resolve_model(request, f"nvidia/{slug}", slug=True)
    return await _rank(request, body, top_n=body.top_k)


async def _rank(request: Request, body: RankingRequest, top_n: int | None) -> Any:
    result = await serving.rank(
        request,
        model=body.model,
        query=body.query.text,
        passages=[p.text for p in body.passages],
        truncate=Truncate(body.truncate),
        top_n=top_n,
    )
    return RankingResponse(
        rankings=[
            RankingEntry(index=r.index, logit=r.logit, score=r.probability if body.sigmoid else None)
            for r in result.rankings
        ],
        usage=Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
    )


# -- discovery, health, metadata, metrics -----------------------------------------------------------------------


@router.get("/v1/models", dependencies=[auth("models")])
async def models(request: Request) -> dict[str, Any]:
    state = serving.app_state(request)
    created = int(state.started_at)
    primary = state.model_ids[0]
    # Aliases point at the primary id; the primary entry's root is its own id (LangChain picks by it).
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "nvidia", "root": primary}
        for name in state.model_ids
    ]
    return {"object": "list", "data": data}


@router.get("/v1/health/live", dependencies=[auth("health")])
async def live() -> dict[str, str]:
    return {"object": "health.response", "message": "Service is live.", "status": "live"}


@router.get("/v1/health/ready", dependencies=[auth("health")])
async def ready(request: Request) -> JSONResponse:
    reason = serving.app_state(request).not_ready_reason
    if reason is None:
        return JSONResponse({"object": "health.response", "message": "Service is ready.", "status": "ready"})
    body = {"object": "health.response", "message": f"Service is not ready: {reason}.", "status": "not_ready"}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/v1/metadata", dependencies=[auth("metadata")])
async def metadata(request: Request) -> dict[str, Any]:
    state = serving.app_state(request)
    settings = state.settings
    runtime = state.runtime
    engine = runtime.engine.info if runtime is not None else None
    ckpt = runtime.checkpoint if runtime is not None else state.checkpoint
    return {
        "id": state.model_ids[0],
        "aliases": state.model_ids[1:],
        "version": __version__,
        "modelInfo": [{"shortName": state.model_ids[0], "modelUrl": f"https://huggingface.co/{state.model_ids[0]}"}],
        "checkpoint": str(ckpt.path) if ckpt is not None else settings.model,
        "random_weights": ckpt.config.random_weights if ckpt is not None else None,
        "backend": engine.backend if engine else None,
        "device": engine.device if engine else None,
        "precision": engine.precision if engine else None,
        "max_seq_length": runtime.encoder.max_length if runtime is not None else settings.max_seq_length,
        "max_passages": settings.max_passages,
        "max_batch_size": settings.max_batch_size,
        "max_batch_tokens": runtime.scheduler.policy.max_batch_tokens if runtime is not None else None,
        "ready": state.ready,
    }


@router.get("/v1/metrics", dependencies=[auth("metrics")], response_class=PlainTextResponse)
@router.get("/metrics", dependencies=[auth("metrics")], include_in_schema=False)
async def metrics(request: Request) -> Response:
    m = serving.app_state(request).metrics
    return Response(m.render(), media_type=m.content_type)

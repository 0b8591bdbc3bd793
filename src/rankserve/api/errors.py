"""Every failure becomes a JSON body `{"error", "detail", "status", "type"}`; status codes are chosen here only."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rankserve import errors as e
from rankserve.api import cohere, tei

log = logging.getLogger(__name__)

STATUS: dict[type[e.RankserveError], int] = {
    e.InputTooLong: 422,  # NIM >= 1.9.1
    e.InvalidRequest: 422,
    e.UnknownModel: 404,
    e.Unauthorized: 401,
    e.Overloaded: 429,
    e.ShuttingDown: 503,
    e.NotReady: 503,
    e.DeadlineExceeded: 504,
    e.EngineFailure: 500,
    e.ClientGone: 499,  # nginx's "client closed the request": nobody reads the body
}


# The other dialects' error bodies: the same body plus the key their clients read.
COHERE_PATHS = (cohere.V1_PATH, cohere.V2_PATH)  # Cohere's SDK and docs: `message`
TEI_ERROR_TYPES = {429: "overloaded", 503: "unhealthy", 500: "backend", 504: "backend"}  # else "validation"


def error_body(status: int, message: str, kind: str, path: str | None = None) -> dict[str, Any]:
    # LangChain's NIM client reads `status`, `error`/`title` and `detail`; other clients read `error`.
    body: dict[str, Any] = {"error": message, "detail": message, "status": status, "type": kind}
    if path in COHERE_PATHS:
        body["message"] = message
    elif path == tei.PATH:  # TEI: {"error", "error_type"}
        body["error_type"] = TEI_ERROR_TYPES.get(status, "validation")
    return body


def error_response(
    status: int, message: str, kind: str, headers: dict[str, str] | None = None, path: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind, path), status_code=status, headers=headers)


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def rankserve_error(exc: e.RankserveError, path: str | None = None) -> JSONResponse:
    status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)
    if path == tei.PATH and isinstance(exc, e.InputTooLong):
        status = 413  # TEI's status for an input over the limit without truncation
    headers = None
    if isinstance(exc, e.Overloaded):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif isinstance(exc, (e.NotReady, e.ShuttingDown)):
        headers = {"Retry-After": "5"}  # loading, broken or draining: try again later (or elsewhere)
    elif status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return error_response(status, exc.message, _snake(type(exc).__name__), headers, path)


def describe_validation(errors: list[Any]) -> tuple[int, str]:
    """(status, message) for pydantic errors: 400 for a body that is not JSON, 422 naming fields otherwise."""
    parts = []
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx", {}).get("error", "")
            return 400, f"the request body is not valid JSON ({ctx})" if ctx else "the request body is not valid JSON"
        field = ".".join(loc) or "body"
        if err.get("type") == "extra_forbidden":
            parts.append(f"{field}: unknown field")
        elif err.get("type") == "missing":
            parts.append(f"{field}: field required")
        else:
            parts.append(f"{field}: {err.get('msg', 'invalid')}")
    return 422, "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    @app.exception_handler(e.RankserveError)
    async def _rankserve(request: Request, exc: e.RankserveError) -> JSONResponse:
        response = rankserve_error(exc, request.url.path)
        if isinstance(exc, e.InputTooLong):
            request.scope["rankserve.rejection"] = "validation"  # whatever the status (TEI: 413)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = describe_validation(list(exc.errors()))
        return error_response(status, message, "invalid_request", path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(exc.status_code, message, "http_error", getattr(exc, "headers", None), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", "internal_error", path=request.url.path)

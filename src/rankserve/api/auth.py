"""Bearer-token authentication, one dependency for every route (NIM and the other dialects alike)."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Depends, Request

from rankserve.errors import Unauthorized


def _check_key(request: Request) -> None:
    key = request.app.state.rs.settings.api_key
    if not key:
        return  # auth off: whatever Authorization header a client sends is ignored
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise Unauthorized("a valid API key is required: send `Authorization: Bearer <key>`")


def auth(group: str | None) -> Any:
    """Inference routes (group None) always need the key when one is set; others unless listed as public."""

    def dependency(request: Request) -> None:
        if group is None or group not in request.app.state.rs.settings.auth_public_routes:
            _check_key(request)

    return Depends(dependency)

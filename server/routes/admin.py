"""GET and POST /admin/routing: the routes and their weights, and a weight changed at runtime (persisted
in the state directory, so it outlives a restart). Admin keys only (server.admin_keys)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.errors import APIError, bad_request
from server.routes.deps import get_state, request_key

router = APIRouter()


def _routing(request: Request) -> Any:
    if not request_key(request).admin:
        raise APIError(
            403, "/admin/routing needs an admin API key (server.admin_keys).", code="admin_key_required"
        )
    routing = get_state(request).routing
    if routing is None:
        raise APIError(
            404, "Routing is off on this server (routing.enabled: false).", code="routing_disabled"
        )
    return routing


@router.get("/admin/routing")
async def show_routing(request: Request) -> JSONResponse:
    return JSONResponse({"models": _routing(request).describe()})


@router.post("/admin/routing")
async def set_routing(request: Request) -> JSONResponse:
    """Body: {"model": "...", "weight": 0-100}."""
    routing = _routing(request)
    try:
        body = await request.json()
    except ValueError:
        raise bad_request('The body must be JSON: {"model": ..., "weight": 0-100}.') from None
    if not isinstance(body, dict) or set(body) != {"model", "weight"} or not isinstance(body["model"], str):
        raise bad_request('The body must be {"model": "<served model>", "weight": <0-100>}.')
    await routing.set_weight(body["model"], body["weight"], "admin")
    return JSONResponse({"models": routing.describe()})

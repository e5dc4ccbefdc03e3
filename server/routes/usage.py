"""GET /v1/usage?since=7d&by=model|key|backend: the usage report (server/usage_report.py) as JSON, the
same JSON as `glm-serve usage report --format json`. Admin keys only (server.admin_keys)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.errors import APIError, bad_request
from server.routes.deps import get_state, request_key
from server.usage_report import build_report

router = APIRouter()


@router.get("/v1/usage")
async def usage_report(request: Request, since: str | None = None, by: str = "model") -> JSONResponse:
    state = get_state(request)
    if not request_key(request).admin:
        raise APIError(
            403, "GET /v1/usage needs an admin API key (server.admin_keys).", code="admin_key_required"
        )
    if state.usage is None:
        raise APIError(
            404, "The usage ledger is off on this server (usage.enabled: false).", code="usage_disabled"
        )
    recorder = state.usage
    await asyncio.to_thread(recorder.ledger.flush)  # rows of requests already answered are in the report
    try:
        report = await asyncio.to_thread(build_report, recorder.ledger.path, recorder.cfg, since, by)
    except ValueError as exc:
        raise bad_request(
            str(exc).replace("--", ""), param="since" if "since" in str(exc) else "by"
        ) from None
    return JSONResponse(report)

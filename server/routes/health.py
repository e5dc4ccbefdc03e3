"""GET /health (200 serving; 503 loading, draining, failed or dead) and GET /version."""

from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.routes.deps import get_state, ready_engine

router = APIRouter()


def server_version() -> str:
    try:
        return metadata.version("glm-serve")
    except metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return "0+unknown"


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    ready_engine(get_state(request))  # raises the 503 that says why
    return JSONResponse({"status": "serving"})


@router.get("/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": server_version()})

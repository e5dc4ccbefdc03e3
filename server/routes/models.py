"""GET /v1/models: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.protocol import ModelCard, ModelList
from server.routes.deps import get_state, ready_engine

router = APIRouter()


@router.get("/v1/models", response_model=None)
async def list_models(request: Request) -> Response:
    state = get_state(request)
    engine = ready_engine(state)
    card = ModelCard(
        id=state.served_model_name,
        created=int(state.started_at),
        root=str(getattr(engine, "model_dir", None) or state.config.engine.model or engine.model_name),
        max_model_len=engine.max_model_len,
    )
    aliases = [card.model_copy(update={"id": name}) for name in state.config.server.served_model_aliases]
    return Response(ModelList(data=[card, *aliases]).model_dump_json(), media_type="application/json")

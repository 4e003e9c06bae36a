"""Routes that generate nothing: health, Prometheus metrics, the model list, the chat page
and the API's documentation (``/docs``, a static page: no scripts fetched from elsewhere)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, PlainTextResponse

STATIC = Path(__file__).resolve().parents[1] / "static"
router = APIRouter()


def _card(state, name: str) -> dict:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "pocketlm",
            "context_length": state.schedulers[name].max_len}


@router.get("/health")
async def health(request: Request):
    return {"status": "ok", "models": sorted(request.app.state.schedulers)}


@router.get("/metrics")
async def metrics(request: Request):
    state = request.app.state
    return PlainTextResponse(state.metrics.render(state.schedulers),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models")
async def list_models(request: Request):
    state = request.app.state
    return {"object": "list", "data": [_card(state, k) for k in state.schedulers]}


@router.get("/v1/models/{name:path}")
async def get_model(name: str, request: Request):
    state = request.app.state
    state.model_for(name)  # 404 in OpenAI's shape for a model not served
    return _card(state, name)


@router.get("/")
async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/docs")
async def docs():
    return FileResponse(STATIC / "docs.html", media_type="text/html")

"""The OpenAI-compatible server: a FastAPI app over one continuous-batching Scheduler per model.

    app = create_app({"smollm2": pocketlm.load("smollm2-135m-instruct")}, api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with
``stream``), ``GET /health``, ``GET /metrics`` (Prometheus text), the chat page at ``/`` and
the API's documentation at ``/docs`` (``static/docs.html``: fields beyond OpenAI's, drafts).
Every request's tokens come from the scheduler's one decode loop; the non-streaming reply is
a fold over the same event stream the streaming reply sends (``serve/generation.py``,
``serve/streaming.py``). The routes are ``APIRouter``s in ``serve/routes/`` reading what this
module puts on ``app.state``. ``/v1/completions`` with ``echo`` returns the prompt first, and
with ``logprobs`` the prompt tokens' log-probs from one forward pass (``serve/echo.py``;
``max_tokens: 0`` scores without generating). Errors (``serve/errors.py``) use OpenAI's body,
``{"error": {"message", "type", "param", "code"}}``, with 400 for bad input, 401 for a
missing/wrong key, 404 for an unknown model or route, 429 (+ ``Retry-After``) when the queue
is full, 408 when a request runs past ``timeout``.

Speculative decoding (``drafts``, ``pocketlm serve MODEL --draft DRAFT``): while a model has
exactly one request generating, its scheduler drafts and verifies (``engine/scheduler.py``);
with several, they decode batched as without a draft. Greedy output is the same token for
token (verification runs the fused step's arithmetic), sampled output keeps the target's distribution. A request may send ``"speculative":
false`` (decode plainly) or ``"draft_tokens": K`` (1..64 or "auto"); its ``usage`` says what
speculation did, ``"speculative": {"draft", "drafted", "accepted", "acceptance_rate",
"passes"}``, and ``/metrics`` counts drafted and accepted tokens per model.
"""

from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from pocketlm.engine.scheduler import Scheduler
from pocketlm.serve.errors import MAX_BODY_BYTES, APIError, install_handlers
from pocketlm.serve.metrics import Metrics
from pocketlm.serve.routes import chat, completions, info

__all__ = ["MAX_BODY_BYTES", "APIError", "Metrics", "create_app"]


# -- the app -----------------------------------------------------------------------------------
def create_app(
    models: dict,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    timeout: float | None = None,
    log_prompts: bool = False,
    max_len: int | None = None,
    router=None,
    route_models: dict[str, str] | None = None,
    drafts: dict | None = None,
    draft_tokens: int | str = "auto",
) -> FastAPI:
    """The FastAPI app serving ``models`` ({id: Model}); see the module docstring.

    ``max_batch`` sequences per model decode together, ``max_queue`` more may wait (then 429),
    ``timeout`` seconds bounds each request (queueing included), ``max_len`` caps the context
    of each batch row (default min(model context, 4096)). With ``router`` (a
    ``hybrid.router.Router``) and ``route_models`` ({route name: served model id}), a chat
    request for model ``"auto"`` goes to the route the router picks for its last user message;
    the reply says which in a ``route`` field and an ``X-Pocketlm-Route`` header. ``drafts``
    ({served model id: draft}, each what ``speculative.make_draft`` takes: a loaded Model,
    a name/path, "self[:L]", "lookup[:N]") speculates for those models with ``draft_tokens``
    (K or "auto"). Raises ValueError for no models, or for a route or draft naming a model
    that is not served, and InvalidArgument for a draft with another tokenizer.
    """
    route_models = route_models or {}
    missing = {r: m for r, m in route_models.items() if m not in models}
    if missing:
        raise ValueError(f"routes {missing} name models that are not served ({sorted(models)})")
    if not models:
        raise ValueError("create_app needs at least one model")
    drafts = drafts or {}
    if set(drafts) - set(models):
        raise ValueError(f"drafts for {sorted(set(drafts) - set(models))}, which are not served")
    schedulers = {}
    try:
        for name, m in models.items():
            schedulers[name] = Scheduler(m, max_batch, max_queue, max_len,
                                         draft=drafts.get(name), draft_tokens=draft_tokens)
    except Exception:  # a refused draft: stop the schedulers already running
        for s in schedulers.values():
            s.stop()
        raise
    metrics = Metrics()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        for s in schedulers.values():  # after uvicorn drained (or gave up on) open requests
            s.stop()

    app = FastAPI(
        title="pocketlm", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.schedulers = schedulers
    app.state.metrics = metrics
    app.state.created = created
    app.state.timeout, app.state.log_prompts = timeout, log_prompts
    app.state.router, app.state.route_models = router, route_models

    # -- errors, auth, metrics ---------------------------------------------------------------
    install_handlers(app)
    app.add_middleware(_Guard, api_key=api_key, metrics=metrics)

    def model_for(name) -> tuple[str, Scheduler]:
        if name not in schedulers:
            raise APIError(
                404,
                f"model {name!r} is not served here; available: {sorted(schedulers)}",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )
        return name, schedulers[name]

    app.state.model_for = model_for

    app.include_router(info.router)  # health, metrics, model list, chat page
    app.include_router(chat.router)
    app.include_router(completions.router)
    return app


_ROUTES = {"/", "/docs", "/health", "/metrics", "/v1/models", "/v1/chat/completions",
           "/v1/completions"}


class _Guard:
    """Pure ASGI middleware: the API key check and per-route request counts.

    (Not ``@app.middleware("http")``: that wrapper re-plumbs ``receive``, which hides client
    disconnects from the handlers, and costs a task per streamed chunk.)
    """

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else b""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in _ROUTES else "other"
        public = path == "/health" or path in ("/", "/docs") and scope["method"] == "GET"
        if self.api_key and not public:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                self.metrics.count_request(route, 401)
                response = APIError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    code="invalid_api_key",
                ).response()
                return await response(scope, receive, send)
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                self.metrics.count_request(route, status[0])
            await send(message)

        await self.app(scope, receive, send_counted)

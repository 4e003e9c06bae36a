"""The OpenAI-compatible server: a FastAPI app over one continuous-batching Scheduler per model.

    app = create_app({"smollm2": pocketlm.load("smollm2-135m-instruct")}, api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with
``stream``), ``GET /health``, ``GET /metrics`` (Prometheus text) and the chat page at ``/``.
Every request's tokens come from the scheduler's one decode loop; the non-streaming reply is
a fold over the same event stream the streaming reply sends. ``/v1/completions`` with
``echo`` returns the prompt first, and with ``logprobs`` the prompt tokens' log-probs from one
forward pass (``serve/echo.py``; ``max_tokens: 0`` scores without generating). Errors use OpenAI's body,
``{"error": {"message", "type", "param", "code"}}``, with 400 for bad input, 401 for a
missing/wrong key, 404 for an unknown model or route, 429 (+ ``Retry-After``) when the queue
is full, 408 when a request runs past ``timeout``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pocketlm.engine.generate import Token
from pocketlm.engine.sampling import SamplingParams
from pocketlm.engine.scheduler import QueueFull, Request, Scheduler
from pocketlm.errors import ContextOverflow, PocketError
from pocketlm.serve.routes import info
from pocketlm.serve.schemas import ChatRequest, CompletionRequest, ResponseFormat

log = logging.getLogger("pocketlm.serve")
STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 8 * 2**20  # far above any context these models take


class APIError(Exception):
    """An error answered as OpenAI's error body with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# -- metrics ---------------------------------------------------------------------------------
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))


class Metrics:
    """Counters and histograms, rendered as Prometheus text (no client library needed)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        self.hist: dict[tuple[str, str], list] = {}  # (metric, route) -> [bucket counts, sum, n]

    def count_request(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[route, status] = self.requests.get((route, status), 0) + 1

    def count_tokens(self, model: str, kind: str, n: int) -> None:
        with self.lock:
            self.tokens[model, kind] = self.tokens.get((model, kind), 0) + n

    def observe(self, metric: str, route: str, seconds: float) -> None:
        with self.lock:
            h = self.hist.setdefault((metric, route), [[0] * len(_BUCKETS), 0.0, 0])
            for i, b in enumerate(_BUCKETS):
                if seconds <= b:
                    h[0][i] += 1
            h[1] += seconds
            h[2] += 1

    def render(self, schedulers: dict[str, Scheduler]) -> str:
        out = [
            "# HELP pocketlm_requests_total HTTP requests by route and status code.",
            "# TYPE pocketlm_requests_total counter",
        ]
        with self.lock:
            for (route, code), n in sorted(self.requests.items()):
                out.append(f'pocketlm_requests_total{{route="{route}",code="{code}"}} {n}')
            for kind in ("prompt", "completion"):
                out += [
                    f"# HELP pocketlm_{kind}_tokens_total {kind.title()} tokens processed.",
                    f"# TYPE pocketlm_{kind}_tokens_total counter",
                ]
                for name in schedulers:
                    n = self.tokens.get((name, kind), 0)
                    out.append(f'pocketlm_{kind}_tokens_total{{model="{name}"}} {n}')
            for metric, help_ in (
                ("request_duration_seconds", "Time from request to last token."),
                ("time_to_first_token_seconds", "Time from request to first token."),
            ):
                out += [f"# HELP pocketlm_{metric} {help_}", f"# TYPE pocketlm_{metric} histogram"]
                for (m, route), (buckets, total, n) in sorted(self.hist.items()):
                    if m != metric:
                        continue
                    for b, c in zip(_BUCKETS, buckets):
                        le = "+Inf" if b == float("inf") else f"{b:g}"
                        out.append(f'pocketlm_{metric}_bucket{{route="{route}",le="{le}"}} {c}')
                    out.append(f'pocketlm_{metric}_sum{{route="{route}"}} {total:.6f}')
                    out.append(f'pocketlm_{metric}_count{{route="{route}"}} {n}')
        out += [
            "# HELP pocketlm_queue_length Requests waiting for a batch row.",
            "# TYPE pocketlm_queue_length gauge",
        ]
        out += [
            f'pocketlm_queue_length{{model="{k}"}} {s.queue_length}' for k, s in schedulers.items()
        ]
        out += [
            "# HELP pocketlm_active_sequences Sequences decoding now.",
            "# TYPE pocketlm_active_sequences gauge",
        ]
        out += [
            f'pocketlm_active_sequences{{model="{k}"}} {s.active}' for k, s in schedulers.items()
        ]
        out += [
            "# HELP pocketlm_decode_steps_total Batched decode steps run.",
            "# TYPE pocketlm_decode_steps_total counter",
        ]
        out += [
            f'pocketlm_decode_steps_total{{model="{k}"}} {s.steps}' for k, s in schedulers.items()
        ]
        return "\n".join(out) + "\n"


# -- one generation, as events -----------------------------------------------------------------
class _Generation:
    """The n (or prompts x n) sequences of one HTTP request and their shared event queue."""

    def __init__(
        self,
        sched: Scheduler,
        prompts: list[list[int]],
        params: list[SamplingParams],
        timeout: float | None,
        constraint_factory=None,
    ):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Token] = asyncio.Queue()
        self.sched = sched
        self.prompts = prompts
        self.requests = [
            Request(
                p,
                sp,
                self._sink,
                index=i,
                timeout=timeout,
                constraint=constraint_factory() if constraint_factory else None,
            )
            for i, (p, sp) in enumerate(zip(prompts, params))
        ]
        self.started = time.monotonic()
        self.first_token_at: float | None = None

    def _sink(self, tok: Token) -> None:  # scheduler thread -> event loop
        self.loop.call_soon_threadsafe(self.queue.put_nowait, tok)

    def submit(self) -> None:
        try:
            self.sched.submit(self.requests)
        except QueueFull as e:
            raise APIError(
                429,
                str(e),
                type="rate_limit_exceeded",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None

    async def events(self, http: HTTPRequest | None = None) -> AsyncIterator[Token]:
        """Every Token of every sequence as it comes; cancels them all if abandoned."""
        remaining = len(self.requests)
        checked = time.monotonic()
        try:
            while remaining:
                if http is not None and time.monotonic() - checked > 0.25:
                    checked = time.monotonic()
                    if await http.is_disconnected():  # nobody is waiting for the answer
                        return
                try:
                    tok = await asyncio.wait_for(self.queue.get(), 0.25)
                except TimeoutError:
                    continue
                if self.first_token_at is None and tok.id >= 0:
                    self.first_token_at = time.monotonic()
                if tok.finish_reason:
                    remaining -= 1
                yield tok
        finally:
            for r in self.requests:
                r.cancel()  # a no-op for finished ones; frees the rows of abandoned ones


def _finish_error(reason: str, timeout: float | None) -> APIError | None:
    if reason == "timeout":
        return APIError(
            408,
            f"generation ran past the server's per-request timeout of {timeout}s; "
            "ask for fewer tokens (max_tokens) or start the server with a larger "
            "--timeout",
            type="timeout",
            code="timeout",
        )
    if reason == "cancelled":
        return APIError(
            503,
            "the server is shutting down; retry on another replica",
            type="server_error",
            code="shutting_down",
        )
    if reason == "error":
        return APIError(
            500, "the engine failed on this batch (see the server log)", type="server_error"
        )
    return None


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
) -> FastAPI:
    """The FastAPI app serving ``models`` ({id: Model}); see the module docstring.

    ``max_batch`` sequences per model decode together, ``max_queue`` more may wait (then 429),
    ``timeout`` seconds bounds each request (queueing included), ``max_len`` caps the context
    of each batch row (default min(model context, 4096)). With ``router`` (a
    ``hybrid.router.Router``) and ``route_models`` ({route name: served model id}), a chat
    request for model ``"auto"`` goes to the route the router picks for its last user message;
    the reply says which in a ``route`` field and an ``X-Pocketlm-Route`` header. Raises
    ValueError for no models, or for a route naming a model that is not served.
    """
    route_models = route_models or {}
    missing = {r: m for r, m in route_models.items() if m not in models}
    if missing:
        raise ValueError(f"routes {missing} name models that are not served ({sorted(models)})")
    if not models:
        raise ValueError("create_app needs at least one model")
    schedulers = {name: Scheduler(m, max_batch, max_queue, max_len) for name, m in models.items()}
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

    # -- errors, auth, metrics ---------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return APIError(
            e.status_code, f"{request.method} {request.url.path}: {e.detail}", type=kind
        ).response()

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("unhandled error")
        return APIError(
            500, f"internal error ({type(e).__name__}); see the server log", type="server_error"
        ).response()

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

    # -- generation --------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        req = await _parse(http, ChatRequest)
        route = None
        if req.model == "auto" and router is not None and "auto" not in schedulers:
            query = next((m.text() for m in reversed(req.messages) if m.role == "user"), "")
            d = await asyncio.to_thread(router.decide, query)
            route = {"name": d.route, "confidence": d.confidence, "fallback": d.fallback,
                     "reason": d.reason}
            req.model = route_models[d.route]
        name, sched = model_for(req.model)
        tok = sched.tokenizer
        _refuse_unsupported(req)
        if req.tools:
            raise APIError(
                400,
                "tools / function calling is not supported by pocketlm serve",
                param="tools",
                code="unsupported_parameter",
            )
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        messages = [
            {"role": m.role if m.role != "developer" else "system", "content": m.text()}
            for m in req.messages
        ]
        if not tok.has_chat_template:
            raise APIError(
                400, f"model {name!r} has no chat template; use /v1/completions", param="model"
            )
        try:
            prompt = sched.model.chat_prompt(messages)
        except PocketError as e:
            raise APIError(400, str(e), param="messages") from None
        except Exception as e:  # noqa: BLE001 -- a template that raises on these messages
            raise APIError(
                400, f"the chat template rejected these messages: {e}", param="messages"
            ) from None
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        top = (req.top_logprobs or 0) if req.logprobs else 0
        params = _params(req, max_tokens if max_tokens is not None else sched.max_len, top)
        factory = await asyncio.to_thread(_constraint, req.response_format, sched, req.ignore_eos)
        _log(name, "chat", prompt, messages if log_prompts else None)
        gen = _Generation(
            sched, [prompt] * req.n, [_seeded(params, i) for i in range(req.n)], timeout, factory
        )
        _submit(gen, sched)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        usage_prompt = len(prompt)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            resp = _sse(_chat_stream(gen, rid, name, req.logprobs, include_usage, usage_prompt))
            if route:
                resp.headers["X-Pocketlm-Route"] = route["name"]
            return resp
        texts, reasons, lps, n_out = await _fold(gen, http, req.logprobs)
        _done(gen, name, "/v1/chat/completions", usage_prompt, n_out)
        body = {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": texts[i], "refusal": None},
                    "logprobs": {"content": lps[i]} if req.logprobs else None,
                    "finish_reason": reasons[i],
                }
                for i in range(req.n)
            ],
            "usage": _usage(usage_prompt, n_out),
        }
        if route is None:
            return body
        body["route"] = route
        return JSONResponse(body, headers={"X-Pocketlm-Route": route["name"]})

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        req = await _parse(http, CompletionRequest)
        name, sched = model_for(req.model)
        _refuse_unsupported(req)
        if req.suffix or (req.best_of not in (None, 1, req.n)):
            raise APIError(
                400,
                "suffix and best_of are not supported by pocketlm serve",
                code="unsupported_parameter",
            )
        if req.echo and req.stream:
            raise APIError(
                400, "echo is not supported with stream; send stream: false", param="echo",
                code="unsupported_parameter",
            )
        prompts = _completion_prompts(req.prompt, sched)
        top = req.logprobs or 0
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        if req.echo:  # the prompt's own tokens (and log-probs) lead each choice
            echoed = await _echo(req, prompts, sched, top)
            if max_tokens == 0:  # scoring only: nothing to generate, no batch row taken
                return _echo_only(req, name, prompts, echoed)
        params = _params(req, max_tokens, top)
        factory = await asyncio.to_thread(_constraint, req.response_format, sched, req.ignore_eos)
        _log(name, "completion", prompts[0], req.prompt if log_prompts else None)
        all_prompts = [p for p in prompts for _ in range(req.n)]
        all_params = [_seeded(params, j) for _ in prompts for j in range(req.n)]
        gen = _Generation(sched, all_prompts, all_params, timeout, factory)
        _submit(gen, sched)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        usage_prompt = sum(len(p) for p in prompts)
        want_lp = req.logprobs is not None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(_completion_stream(gen, rid, name, want_lp, include_usage, usage_prompt))
        texts, reasons, lps, n_out = await _fold(gen, http, want_lp)
        _done(gen, name, "/v1/completions", usage_prompt, n_out)
        body = {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": i,
                    "text": texts[i],
                    "logprobs": _legacy_logprobs(lps[i]) if want_lp else None,
                    "finish_reason": reasons[i],
                }
                for i in range(len(all_prompts))
            ],
            "usage": _usage(usage_prompt, n_out),
        }
        if req.echo:
            for c in body["choices"]:
                text, lp = echoed[c["index"] // req.n]
                c["text"] = text + c["text"]
                c["logprobs"] = _join_logprobs(lp, c["logprobs"], len(text))
        return body

    # -- helpers that need the app's state -----------------------------------------------------
    async def _echo(req, prompts, sched: Scheduler, top: int) -> list[tuple[str, dict | None]]:
        """(echoed text, legacy logprobs or None) per prompt, each scored in one pass."""
        from pocketlm.serve.echo import echo_logprobs

        texts = (
            [req.prompt] if isinstance(req.prompt, str)
            else list(req.prompt) if all(isinstance(p, str) for p in req.prompt)
            else [None] * len(prompts)
        )
        out = []
        for text, ids in zip(texts, prompts):
            if len(ids) > sched.max_len:
                raise APIError(
                    400,
                    f"the prompt is {len(ids)} tokens but this server's context per "
                    f"request is {sched.max_len}; shorten the prompt",
                    param="prompt",
                    code="context_length_exceeded",
                )
            shown = text if text is not None else sched.tokenizer.decode(ids)
            lp = None
            if req.logprobs is not None:
                lp = await asyncio.to_thread(echo_logprobs, sched.model, text, ids, top)
            out.append((shown, lp))
        return out

    def _echo_only(req, name: str, prompts, echoed) -> dict:
        n_prompt = sum(len(p) for p in prompts)
        metrics.count_tokens(name, "prompt", n_prompt)
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": i,
                    "text": echoed[i // req.n][0],
                    "logprobs": echoed[i // req.n][1],
                    "finish_reason": "length",
                }
                for i in range(len(prompts) * req.n)
            ],
            "usage": _usage(n_prompt, 0),
        }

    def _submit(gen: _Generation, sched: Scheduler) -> None:
        for p in gen.prompts:
            if len(p) >= sched.max_len:
                raise APIError(
                    400,
                    f"the prompt is {len(p)} tokens but this server's context per "
                    f"request is {sched.max_len}; shorten the prompt",
                    param="messages",
                    code="context_length_exceeded",
                )
        most = sched.max_batch + sched.max_queue
        if len(gen.requests) > most:
            raise APIError(
                400,
                f"this request asks for {len(gen.requests)} sequences (prompts x n); the server "
                f"runs at most {most} at once (--max-batch + --max-queue); split it",
                param="n",
            )
        try:
            gen.submit()
        except ContextOverflow as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        except PocketError as e:
            raise APIError(400, str(e)) from None

    def _done(gen: _Generation, name: str, route: str, n_prompt: int, n_out: int) -> None:
        metrics.count_tokens(name, "prompt", n_prompt)
        metrics.count_tokens(name, "completion", n_out)
        metrics.observe("request_duration_seconds", route, time.monotonic() - gen.started)
        if gen.first_token_at is not None:
            metrics.observe("time_to_first_token_seconds", route, gen.first_token_at - gen.started)

    def _log(name, kind, prompt_ids, prompt_text) -> None:
        if prompt_text is not None:
            log.info(
                "%s request to %s, %d prompt tokens: %r", kind, name, len(prompt_ids), prompt_text
            )
        else:
            log.info("%s request to %s, %d prompt tokens", kind, name, len(prompt_ids))

    async def _fold(gen: _Generation, http: HTTPRequest, want_lp: bool):
        """The non-streaming reply: a fold over the event stream."""
        n = len(gen.requests)
        texts, reasons, lps, n_out = [""] * n, [None] * n, [[] for _ in range(n)], 0
        async for t in gen.events(http):
            if t.id >= 0:
                n_out += 1
                if want_lp:
                    lps[t.index].append(_lp_entry(gen.sched, t))
            texts[t.index] += t.text
            if t.finish_reason:
                err = _finish_error(t.finish_reason, timeout)
                if err:
                    raise err
                reasons[t.index] = t.finish_reason
        return texts, reasons, lps, n_out

    async def _chat_stream(gen, rid, name, want_lp, include_usage, n_prompt):
        created_at = int(time.time())

        def chunk(choices, usage=None):
            body = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created_at,
                "model": name,
                "system_fingerprint": None,
                "choices": choices,
            }
            if include_usage:
                body["usage"] = usage
            return body

        n_out = 0
        yield chunk(
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for i in range(len(gen.requests))
            ]
        )
        async for t in gen.events():
            if t.id >= 0:
                n_out += 1
            err = _finish_error(t.finish_reason, timeout) if t.finish_reason else None
            if err:
                yield {"error": {"message": err.message, "type": err.type, "code": err.code}}
                return
            lp = {"content": [_lp_entry(gen.sched, t)]} if want_lp and t.id >= 0 else None
            if t.text or lp:
                yield chunk(
                    [
                        {
                            "index": t.index,
                            "delta": {"content": t.text},
                            "logprobs": lp,
                            "finish_reason": None,
                        }
                    ]
                )
            if t.finish_reason:
                yield chunk(
                    [
                        {
                            "index": t.index,
                            "delta": {},
                            "logprobs": None,
                            "finish_reason": t.finish_reason,
                        }
                    ]
                )
        _done(gen, name, "/v1/chat/completions", n_prompt, n_out)
        if include_usage:
            yield chunk([], _usage(n_prompt, n_out))

    async def _completion_stream(gen, rid, name, want_lp, include_usage, n_prompt):
        created_at = int(time.time())

        def chunk(choices, usage=None):
            body = {
                "id": rid,
                "object": "text_completion",
                "created": created_at,
                "model": name,
                "system_fingerprint": None,
                "choices": choices,
            }
            if include_usage:
                body["usage"] = usage
            return body

        n_out = 0
        async for t in gen.events():
            if t.id >= 0:
                n_out += 1
            err = _finish_error(t.finish_reason, timeout) if t.finish_reason else None
            if err:
                yield {"error": {"message": err.message, "type": err.type, "code": err.code}}
                return
            lp = _legacy_logprobs([_lp_entry(gen.sched, t)]) if want_lp and t.id >= 0 else None
            if t.text or lp or t.finish_reason:
                yield chunk(
                    [
                        {
                            "index": t.index,
                            "text": t.text,
                            "logprobs": lp,
                            "finish_reason": t.finish_reason,
                        }
                    ]
                )
        _done(gen, name, "/v1/completions", n_prompt, n_out)
        if include_usage:
            yield chunk([], _usage(n_prompt, n_out))

    return app


_ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}


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
        public = path == "/health" or path == "/" and scope["method"] == "GET"
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


async def _parse(http: HTTPRequest, model):
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is over {MAX_BODY_BYTES // 2**20} MiB")
    raw = await http.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is over {MAX_BODY_BYTES // 2**20} MiB")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        raise APIError(
            400, f"{param}: {err['msg']}" if param else err["msg"], param=param
        ) from None


def _refuse_unsupported(req) -> None:
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise APIError(
                400,
                f"{name} is not supported; use repetition_penalty (> 1) instead",
                param=name,
                code="unsupported_parameter",
            )
    if req.logit_bias:
        raise APIError(
            400,
            "logit_bias is not supported by pocketlm serve",
            param="logit_bias",
            code="unsupported_parameter",
        )


def _params(req, max_tokens: int, top_logprobs: int) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            min_p=req.min_p,
            seed=req.seed,
            stop=stop,
            repetition_penalty=req.repetition_penalty,
            top_logprobs=top_logprobs,
            ignore_eos=req.ignore_eos,
        )
    except PocketError as e:
        raise APIError(400, str(e)) from None


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    """Choice i of n: its own seed (seed + i) so the n choices differ but stay reproducible."""
    if i == 0 or params.seed is None:
        return params
    from dataclasses import replace

    return replace(params, seed=params.seed + i)


def _completion_prompts(prompt, sched: Scheduler) -> list[list[int]]:
    if isinstance(prompt, str):
        return [sched.model.encode(prompt)]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return [sched.model.encode(p) for p in prompt]
    lists = [prompt] if all(isinstance(p, int) for p in prompt) else prompt
    vocab = sched.model.config.vocab_size
    for ids in lists:
        if any(not 0 <= i < vocab for i in ids):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
    return [list(ids) for ids in lists]


def _constraint(fmt: ResponseFormat | None, sched: Scheduler, ignore_eos: bool = False):
    if fmt is None or fmt.type == "text":
        return None
    if ignore_eos:
        raise APIError(
            400,
            "ignore_eos cannot be combined with a JSON response_format: the value ends with "
            "the end-of-sequence token",
            param="ignore_eos",
        )
    from pocketlm.serve.constrain import JsonConstraint, compile_schema

    if fmt.type == "json_object":
        schema = None
    else:
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(
                400, "response_format json_schema needs json_schema.schema", param="response_format"
            )
        schema = fmt.json_schema.schema_
    try:
        grammar = compile_schema(schema)
    except PocketError as e:
        raise APIError(400, str(e), param="response_format") from None
    vocab = JsonConstraint.vocabulary(sched.tokenizer, sched.model.config.vocab_size)
    return lambda: JsonConstraint(grammar, vocab)


def _lp_entry(sched: Scheduler, t: Token) -> dict:
    def item(i, lp):
        s = sched.tokenizer.token_text(i)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {**item(t.id, t.logprob), "top_logprobs": [item(i, lp) for i, lp in t.top_logprobs]}


def _legacy_logprobs(entries: list[dict]) -> dict:
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{x["token"]: x["logprob"] for x in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


def _join_logprobs(prompt: dict | None, generated: dict | None, shift: int) -> dict | None:
    """The echoed prompt's legacy logprobs followed by the generated tokens', whose text
    offsets move past the prompt's ``shift`` characters."""
    if prompt is None:
        return generated
    if generated is None:
        return prompt
    return {
        "tokens": prompt["tokens"] + generated["tokens"],
        "token_logprobs": prompt["token_logprobs"] + generated["token_logprobs"],
        "top_logprobs": prompt["top_logprobs"] + generated["top_logprobs"],
        "text_offset": prompt["text_offset"] + [o + shift for o in generated["text_offset"]],
    }


def _usage(n_prompt: int, n_out: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        async for e in events:
            yield f"data: {json.dumps(e, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )

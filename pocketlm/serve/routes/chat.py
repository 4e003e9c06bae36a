"""``POST /v1/chat/completions``: the chat template, then one generation per choice; with a
router, model ``"auto"`` goes to the route it picks for the last user message."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse

from pocketlm.errors import PocketError
from pocketlm.serve.errors import APIError
from pocketlm.serve.generation import (
    envelope,
    fold,
    launch,
    open_request,
    record,
    sampling_params,
    usage_of,
)
from pocketlm.serve.schemas import ChatRequest
from pocketlm.serve.streaming import chat_stream, sse

router = APIRouter()


async def route_auto(state, req: ChatRequest) -> dict | None:
    """Model ``"auto"`` with a router: the route it picks for the last user message (and
    ``req.model`` becomes that route's model); None otherwise."""
    if req.model != "auto" or state.router is None or "auto" in state.schedulers:
        return None
    query = next((m.text() for m in reversed(req.messages) if m.role == "user"), "")
    d = await asyncio.to_thread(state.router.decide, query)
    req.model = state.route_models[d.route]
    return {"name": d.route, "confidence": d.confidence, "fallback": d.fallback,
            "reason": d.reason}


@router.post("/v1/chat/completions")
async def chat_completions(http: HTTPRequest):
    state, req, name, sched, route = await open_request(http, ChatRequest, route_auto)
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
    if not sched.tokenizer.has_chat_template:
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
    params = sampling_params(req, max_tokens if max_tokens is not None else sched.max_len, top)
    gen = await launch(state, req, name, sched, "chat", [prompt], params, messages)
    n_prompt = len(prompt)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        resp = sse(chat_stream(state, gen, name, req.logprobs, include_usage, n_prompt))
        if route:
            resp.headers["X-Pocketlm-Route"] = route["name"]
        return resp
    texts, reasons, lps, n_out = await fold(gen, http, req.logprobs, state.timeout)
    record(state.metrics, gen, name, "/v1/chat/completions", n_prompt, n_out)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": texts[i], "refusal": None},
            "logprobs": {"content": lps[i]} if req.logprobs else None,
            "finish_reason": reasons[i],
        }
        for i in range(req.n)
    ]
    body = envelope("chat.completion", name, choices, usage=usage_of(n_prompt, n_out, gen))
    if route is None:
        return body
    body["route"] = route
    return JSONResponse(body, headers={"X-Pocketlm-Route": route["name"]})

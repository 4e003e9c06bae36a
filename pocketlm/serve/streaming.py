"""Server-sent events: the streaming replies of both generation routes, chunk by chunk."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from pocketlm.serve.errors import finish_error
from pocketlm.serve.generation import legacy_logprobs, lp_entry, record, usage_of


def _chunker(rid: str, obj: str, name: str, include_usage: bool):
    """A function making one stream chunk of ``choices`` (usage only where it was asked for);
    every chunk of one stream shares its id and creation time, as OpenAI's do."""
    created_at = int(time.time())

    def chunk(choices, usage=None):
        body = {"id": rid, "object": obj, "created": created_at, "model": name,
                "system_fingerprint": None, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return body

    return chunk


async def chat_stream(state, gen, rid, name, want_lp, include_usage, n_prompt):
    """Chat chunks: the role first, then each token's delta, each choice's finish reason, and
    usage last when asked; ``state`` is app.state (timeout, metrics)."""
    chunk = _chunker(rid, "chat.completion.chunk", name, include_usage)

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
        err = finish_error(t.finish_reason, state.timeout) if t.finish_reason else None
        if err:
            yield {"error": {"message": err.message, "type": err.type, "code": err.code}}
            return
        lp = {"content": [lp_entry(gen.sched, t)]} if want_lp and t.id >= 0 else None
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
    record(state.metrics, gen, name, "/v1/chat/completions", n_prompt, n_out)
    if include_usage:
        yield chunk([], usage_of(n_prompt, n_out))


async def completion_stream(state, gen, rid, name, want_lp, include_usage, n_prompt):
    """Completion chunks, one per token piece (with legacy logprobs when asked)."""
    chunk = _chunker(rid, "text_completion", name, include_usage)

    n_out = 0
    async for t in gen.events():
        if t.id >= 0:
            n_out += 1
        err = finish_error(t.finish_reason, state.timeout) if t.finish_reason else None
        if err:
            yield {"error": {"message": err.message, "type": err.type, "code": err.code}}
            return
        lp = legacy_logprobs([lp_entry(gen.sched, t)]) if want_lp and t.id >= 0 else None
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
    record(state.metrics, gen, name, "/v1/completions", n_prompt, n_out)
    if include_usage:
        yield chunk([], usage_of(n_prompt, n_out))


def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        async for e in events:
            yield f"data: {json.dumps(e, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )

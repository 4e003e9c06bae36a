"""Server-sent events: the streaming replies of both generation routes, chunk by chunk."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from pocketlm.engine.generate import Token
from pocketlm.serve.errors import finish_error
from pocketlm.serve.generation import envelope, legacy_logprobs, lp_entry, record, usage_of


def _chunker(obj: str, name: str, include_usage: bool):
    """A function making one stream chunk of ``choices`` (usage only where it was asked for);
    every chunk of one stream shares its id and creation time, as OpenAI's do."""
    created_at = int(time.time())
    rid = f"{'chatcmpl' if obj.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def chunk(choices, usage=None):
        extra = {"usage": usage} if include_usage else {}
        return envelope(obj, name, choices, rid=rid, created=created_at, **extra)

    return chunk


async def _stream(state, gen, name: str, route: str, n_prompt: int, chunk, include_usage: bool,
                  chunks_of: Callable[[Token], list[dict]]) -> AsyncIterator[dict]:
    """The chunks ``chunks_of`` makes of each Token as the scheduler sends it (a round of
    speculative decoding sends several at once, each its own chunk); an error body in place
    of the rest when generation failed; then usage when asked."""
    n_out = 0
    async for t in gen.events():
        if t.id >= 0:
            n_out += 1
        err = finish_error(t.finish_reason, state.timeout) if t.finish_reason else None
        if err:
            yield {"error": {"message": err.message, "type": err.type, "code": err.code}}
            return
        for c in chunks_of(t):
            yield c
    record(state.metrics, gen, name, route, n_prompt, n_out)
    if include_usage:
        yield chunk([], usage_of(n_prompt, n_out, gen))


async def chat_stream(state, gen, name, want_lp, include_usage, n_prompt):
    """Chat chunks: the role first, then each token's delta, each choice's finish reason, and
    usage last when asked; ``state`` is app.state (timeout, metrics)."""
    chunk = _chunker("chat.completion.chunk", name, include_usage)
    yield chunk(
        [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}
            for i in range(len(gen.requests))
        ]
    )

    def chunks_of(t: Token) -> list[dict]:
        out = []
        lp = {"content": [lp_entry(gen.sched, t)]} if want_lp and t.id >= 0 else None
        if t.text or lp:
            out.append(chunk([{"index": t.index, "delta": {"content": t.text}, "logprobs": lp,
                               "finish_reason": None}]))
        if t.finish_reason:
            out.append(chunk([{"index": t.index, "delta": {}, "logprobs": None,
                               "finish_reason": t.finish_reason}]))
        return out

    async for c in _stream(state, gen, name, "/v1/chat/completions", n_prompt, chunk, include_usage,
                       chunks_of):
        yield c


async def completion_stream(state, gen, name, want_lp, include_usage, n_prompt):
    """Completion chunks, one per token piece (with legacy logprobs when asked)."""
    chunk = _chunker("text_completion", name, include_usage)

    def chunks_of(t: Token) -> list[dict]:
        lp = legacy_logprobs([lp_entry(gen.sched, t)]) if want_lp and t.id >= 0 else None
        if not (t.text or lp or t.finish_reason):
            return []
        return [chunk([{"index": t.index, "text": t.text, "logprobs": lp,
                        "finish_reason": t.finish_reason}])]

    async for c in _stream(state, gen, name, "/v1/completions", n_prompt, chunk, include_usage,
                       chunks_of):
        yield c


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

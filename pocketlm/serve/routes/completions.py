"""``POST /v1/completions``: plain continuation of one or more prompts (text or token ids),
with ``echo`` (the prompt first, and with ``logprobs`` its tokens' log-probs, ``serve/echo.py``)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi import Request as HTTPRequest

from pocketlm.engine.scheduler import Scheduler
from pocketlm.serve.errors import APIError
from pocketlm.serve.generation import (
    completion_prompts,
    envelope,
    fold,
    join_logprobs,
    launch,
    legacy_logprobs,
    open_request,
    record,
    sampling_params,
    usage_of,
)
from pocketlm.serve.schemas import CompletionRequest
from pocketlm.serve.streaming import completion_stream, sse

router = APIRouter()


@router.post("/v1/completions")
async def completions(http: HTTPRequest):
    state, req, name, sched, _ = await open_request(http, CompletionRequest)
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
    prompts = completion_prompts(req.prompt, sched)
    top = req.logprobs or 0
    max_tokens = req.max_tokens if req.max_tokens is not None else 16
    # lm-eval's scoring request (echo, logprobs, one greedy token): the pass that scores the
    # prompt also gives that token, so the scheduler need not prefill the prompt again
    one_greedy = (
        req.echo and req.logprobs is not None and max_tokens == 1 and req.temperature == 0
        and req.n == 1 and req.repetition_penalty == 1.0 and not req.ignore_eos
        and (req.response_format is None or req.response_format.type == "text")
    )
    if max_tokens or not req.echo:
        params = sampling_params(req, max_tokens, top)
    if req.echo:  # the prompt's own tokens (and log-probs) lead each choice
        echoed = await echo_prompts(req, prompts, sched, top, one_greedy)
        if max_tokens == 0:  # scoring only: nothing to generate, no batch row taken
            return echo_only(state.metrics, req, name, prompts, echoed)
        if one_greedy:
            body = greedy_from_echo(state.metrics, name, prompts, echoed, sched, params.stop)
            if body is not None:
                return body
    gen = await launch(state, req, name, sched, "completion", prompts, params, req.prompt)
    n_prompt = sum(len(p) for p in prompts)
    want_lp = req.logprobs is not None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse(completion_stream(state, gen, name, want_lp, include_usage, n_prompt))
    texts, reasons, lps, n_out = await fold(gen, http, want_lp, state.timeout)
    record(state.metrics, gen, name, "/v1/completions", n_prompt, n_out)
    choices = [
        {
            "index": i,
            "text": texts[i],
            "logprobs": legacy_logprobs(lps[i]) if want_lp else None,
            "finish_reason": reasons[i],
        }
        for i in range(len(gen.requests))
    ]
    body = envelope("text_completion", name, choices, usage=usage_of(n_prompt, n_out, gen))
    if req.echo:
        for c in body["choices"]:
            text, lp, _ = echoed[c["index"] // req.n]
            c["text"] = text + c["text"]
            c["logprobs"] = join_logprobs(lp, c["logprobs"], len(text))
    return body


async def echo_prompts(req, prompts, sched: Scheduler, top: int, with_next: bool = False):
    """(echoed text, legacy logprobs or None, greedy next token or None) per prompt, each
    scored in one pass (``serve/echo.py``)."""
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
        lp = nxt = None
        if req.logprobs is not None:
            lp, nxt = await asyncio.to_thread(echo_logprobs, sched.model, text, ids, top,
                                              with_next)
        out.append((shown, lp, nxt))
    return out


def echo_only(metrics, req, name: str, prompts, echoed) -> dict:
    n_prompt = sum(len(p) for p in prompts)
    metrics.count_tokens(name, "prompt", n_prompt)
    choices = [
        {
            "index": i,
            "text": echoed[i // req.n][0],
            "logprobs": echoed[i // req.n][1],
            "finish_reason": "length",
        }
        for i in range(len(prompts) * req.n)
    ]
    return envelope("text_completion", name, choices, usage=usage_of(n_prompt, 0))


def greedy_from_echo(metrics, name: str, prompts, echoed, sched: Scheduler, stop) -> dict | None:
    """The reply for one greedy token per prompt, taken from the echo pass; None (the
    scheduler decodes it instead) when a token would end generation or hit a stop string,
    or a prompt leaves no room for it."""
    tok = sched.tokenizer
    choices = []
    for i, ((shown, lp, nxt), ids) in enumerate(zip(echoed, prompts)):
        tid, tlp, tops = nxt
        piece = tok.token_text(tid)
        if tid in tok.stop_ids or any(s in piece for s in stop) or len(ids) >= sched.max_len:
            return None
        gen = {"tokens": [piece], "token_logprobs": [tlp],
               "top_logprobs": [{tok.token_text(j): v for j, v in tops}], "text_offset": [0]}
        choices.append({"index": i, "text": shown + piece,
                        "logprobs": join_logprobs(lp, gen, len(shown)), "finish_reason": "length"})
    n_prompt = sum(len(p) for p in prompts)
    metrics.count_tokens(name, "prompt", n_prompt)
    metrics.count_tokens(name, "completion", len(prompts))
    return envelope("text_completion", name, choices, usage=usage_of(n_prompt, len(prompts)))

"""One HTTP request's generation as events from the scheduler, and what the routes build on it:
the shared preamble (``open_request``: body, model, refusals, speculation options; ``launch``:
constraint, sequences, submission), sampling parameters, prompts, JSON constraints, logprobs in
both of OpenAI's shapes, the reply's envelope and usage.

The non-streaming reply is ``fold`` over the same events the streaming reply sends
(``serve/streaming.py``), so both come from the scheduler's one decode loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request as HTTPRequest

from pocketlm.engine.generate import Token
from pocketlm.engine.sampling import SamplingParams
from pocketlm.engine.scheduler import QueueFull, Request, Scheduler
from pocketlm.engine.speculative import KControl
from pocketlm.errors import ContextOverflow, PocketError
from pocketlm.serve.errors import APIError, finish_error, parse, refuse_unsupported
from pocketlm.serve.schemas import ResponseFormat

log = logging.getLogger("pocketlm.serve")


class Generation:
    """The n (or prompts x n) sequences of one HTTP request and their shared event queue."""

    def __init__(
        self,
        sched: Scheduler,
        prompts: list[list[int]],
        params: list[SamplingParams],
        timeout: float | None,
        constraint_factory=None,
        speculative: bool = True,
        draft_tokens: int | str | None = None,
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
                speculative=speculative,
                draft_tokens=draft_tokens,
            )
            for i, (p, sp) in enumerate(zip(prompts, params))
        ]
        self.started = time.monotonic()
        self.first_token_at: float | None = None

    def speculation(self) -> dict | None:
        """What speculative decoding did for this request's sequences (None: none could)."""
        stats = [r.stats for r in self.requests if r.stats is not None]
        if not stats:
            return None
        drafted, accepted = sum(s.drafted for s in stats), sum(s.accepted for s in stats)
        return {"draft": stats[0].kind, "drafted": drafted, "accepted": accepted,
                "acceptance_rate": accepted / drafted if drafted else 0.0,
                "passes": sum(s.passes for s in stats)}

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


# -- the preamble both generation routes share ------------------------------------------------
async def open_request(http: HTTPRequest, schema, pick: Callable[..., Awaitable] | None = None):
    """Parse the body as ``schema``, let ``pick(state, req)`` choose the model (the router;
    it may rewrite ``req.model`` and returns what the reply reports, or None), look the model
    up (404), and refuse options we do not implement or speculation this model cannot do.
    Returns (app.state, req, served name, Scheduler, what ``pick`` returned)."""
    state = http.app.state
    req = await parse(http, schema)
    picked = await pick(state, req) if pick is not None else None
    name, sched = state.model_for(req.model)
    refuse_unsupported(req)
    check_speculation(req, name, sched)
    return state, req, name, sched, picked


def check_speculation(req, name: str, sched: Scheduler) -> None:
    """``speculative: true`` or ``draft_tokens`` need a model served with --draft; K must be
    a whole number 1..64 or "auto"."""
    if sched.draft is None and (req.speculative or req.draft_tokens is not None):
        field = "speculative" if req.speculative else "draft_tokens"
        raise APIError(400, f"model {name!r} is served without a draft, so {field} cannot apply; "
                       "start the server with --draft MODEL|self|lookup", param=field)
    if req.draft_tokens is not None:
        try:
            KControl(req.draft_tokens)
        except PocketError as e:
            raise APIError(400, str(e), param="draft_tokens") from None


async def launch(state, req, name: str, sched: Scheduler, kind: str, prompts: list[list[int]],
                 params: SamplingParams, shown) -> Generation:
    """Build and queue the request's sequences: each prompt ``req.n`` times (choice j with
    seed + j), with its JSON constraint and speculation options; ``shown`` is what
    --log-prompts logs."""
    factory = await asyncio.to_thread(constraint_for, req.response_format, sched, req.ignore_eos)
    log_request(name, kind, prompts[0], shown if state.log_prompts else None)
    gen = Generation(
        sched,
        [p for p in prompts for _ in range(req.n)],
        [seeded(params, j) for _ in prompts for j in range(req.n)],
        state.timeout,
        factory,
        speculative=req.speculative is not False,
        draft_tokens=req.draft_tokens,
    )
    submit(gen, sched)
    return gen


def envelope(obj: str, name: str, choices: list, rid: str | None = None,
             created: int | None = None, **fields) -> dict:
    """OpenAI's reply around ``choices``: id (a fresh one unless given), object, created,
    model, then ``fields`` (usage, ...)."""
    prefix = "chatcmpl" if obj.startswith("chat") else "cmpl"
    return {"id": rid or f"{prefix}-{uuid.uuid4().hex[:24]}", "object": obj,
            "created": created if created is not None else int(time.time()), "model": name,
            "system_fingerprint": None, "choices": choices, **fields}


def submit(gen: Generation, sched: Scheduler) -> None:
    """Queue the request's sequences; APIError 400 for a prompt or request too large, 429 when
    the queue is full."""
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


def record(metrics, gen: Generation, name: str, route: str, n_prompt: int, n_out: int) -> None:
    """Count a finished request's tokens and time into ``metrics`` (serve/metrics.py)."""
    metrics.count_tokens(name, "prompt", n_prompt)
    metrics.count_tokens(name, "completion", n_out)
    metrics.observe("request_duration_seconds", route, time.monotonic() - gen.started)
    if gen.first_token_at is not None:
        metrics.observe("time_to_first_token_seconds", route, gen.first_token_at - gen.started)


def log_request(name, kind, prompt_ids, prompt_text) -> None:
    if prompt_text is not None:
        log.info(
            "%s request to %s, %d prompt tokens: %r", kind, name, len(prompt_ids), prompt_text
        )
    else:
        log.info("%s request to %s, %d prompt tokens", kind, name, len(prompt_ids))


async def fold(gen: Generation, http: HTTPRequest, want_lp: bool, timeout: float | None):
    """The non-streaming reply: a fold over the event stream."""
    n = len(gen.requests)
    texts, reasons, lps, n_out = [""] * n, [None] * n, [[] for _ in range(n)], 0
    async for t in gen.events(http):
        if t.id >= 0:
            n_out += 1
            if want_lp:
                lps[t.index].append(lp_entry(gen.sched, t))
        texts[t.index] += t.text
        if t.finish_reason:
            err = finish_error(t.finish_reason, timeout)
            if err:
                raise err
            reasons[t.index] = t.finish_reason
    return texts, reasons, lps, n_out


def sampling_params(req, max_tokens: int, top_logprobs: int) -> SamplingParams:
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


def seeded(params: SamplingParams, i: int) -> SamplingParams:
    """Choice i of n: its own seed (seed + i) so the n choices differ but stay reproducible."""
    if i == 0 or params.seed is None:
        return params
    from dataclasses import replace

    return replace(params, seed=params.seed + i)


def completion_prompts(prompt, sched: Scheduler) -> list[list[int]]:
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


def constraint_for(fmt: ResponseFormat | None, sched: Scheduler, ignore_eos: bool = False):
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


def lp_entry(sched: Scheduler, t: Token) -> dict:
    def item(i, lp):
        s = sched.tokenizer.token_text(i)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {**item(t.id, t.logprob), "top_logprobs": [item(i, lp) for i, lp in t.top_logprobs]}


def legacy_logprobs(entries: list[dict]) -> dict:
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


def join_logprobs(prompt: dict | None, generated: dict | None, shift: int) -> dict | None:
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


def usage_of(n_prompt: int, n_out: int, gen: Generation | None = None) -> dict:
    """OpenAI's usage; with speculative decoding, ``speculative``: {draft, drafted, accepted,
    acceptance_rate, passes} over the request's sequences."""
    usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out,
             "total_tokens": n_prompt + n_out}
    spec = gen.speculation() if gen is not None else None
    if spec is not None:
        usage["speculative"] = spec
    return usage

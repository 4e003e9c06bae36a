"""Continuous batching: many requests, one KV cache, one decode loop on a background thread.

The scheduler owns one ``KVCache`` with ``max_batch`` rows. A new request is prefilled into
a free row (``prefill``); then every step runs one ``decode_step`` over rows 0..n-1 for all
active sequences, each at its own position. Rows in that range with no sequence get a dummy
token at position 0 (their row is overwritten by the next prefill, so the write is harmless).
Each sequence's ``SequenceState.accept`` picks its token and applies its stop rules, exactly
as in ``generate``, so the server and ``Model.generate`` share one code path. A sequence that
finishes, times out or is cancelled (client gone) leaves its row at once, and the next
waiting request takes it before the following step.

Speculative decoding (``draft=``, any kind ``engine/speculative.py`` makes): when exactly one
sequence is active -- batch 1, where a CPU has compute to spare for checking drafts -- each
step is one ``speculate_round`` for it in its own cache row (draft, verify, accept/reject,
the same code as ``pocketlm run --draft``), so greedy output stays the target's token for
token (verification runs through the fused step's own arithmetic: ``fused.verify``) and
sampled output keeps the target's distribution. With two or more active, they
decode batched as without a draft (batching already fills the cores; verifying K tokens per
row would multiply the work). A request may opt out (``Request.speculative``) or set its
own K; a JSON-constrained request never speculates. The draft's cache follows one sequence:
it is reset when another sequence becomes the lone one.

Results go to each request through ``Request.sink``, called on the scheduler thread with
each ``Token``; the server's sink hands them to the event loop thread-safely. The last Token
of a request has a ``finish_reason``: "stop", "length", or "timeout"/"cancelled"/"error".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from pocketlm.engine.generate import SequenceState, Token, check_prompt, decode_step, prefill
from pocketlm.engine.sampling import SamplingParams
from pocketlm.engine.speculative import KControl, SpecStats, make_draft, speculate_round
from pocketlm.errors import PocketError
from pocketlm.model.transformer import KVCache

log = logging.getLogger(__name__)


class QueueFull(PocketError):
    """More requests are waiting than ``max_queue`` allows; retry later."""


class Constraint(Protocol):
    """Restricts which tokens a sequence may pick (e.g. JSON-constrained decoding)."""

    def allowed(self, remaining: int) -> torch.Tensor:  # (V,) bool, given tokens left
        ...

    def advance(self, token_id: int) -> None: ...

    @property
    def complete(self) -> bool: ...


@dataclass
class Request:
    """One sequence to generate. ``sink`` receives every Token on the scheduler thread."""

    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Token], None]
    index: int = 0  # reported in each Token (the choice index)
    timeout: float | None = None  # seconds from submission, queueing included
    constraint: Constraint | None = None
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    speculative: bool = True  # speculate when alone, if the scheduler has a draft
    draft_tokens: int | str | None = None  # K for this request (None: the scheduler's)
    stats: SpecStats | None = None  # what speculation did for it (set when it may speculate)

    def cancel(self) -> None:
        """Stop generating (e.g. the client disconnected); the row is freed at the next step."""
        self.cancelled = True

    @property
    def expired(self) -> bool:
        return self.timeout is not None and time.monotonic() - self.submitted > self.timeout


@dataclass
class _Slot:
    request: Request
    seq: SequenceState
    filled: int = 0  # prompt tokens already in the cache; decoding starts when all are
    ctl: KControl | None = None  # K for speculative rounds; None: this one never speculates


PREFILL_CHUNK = 256  # prompt tokens prefilled between two decode steps (bounds others' stall)


class Scheduler:
    """Continuous batching over one model; thread-safe ``submit``, one background thread.

    ``max_batch`` sequences decode together; up to ``max_queue`` more wait for a row, and
    ``submit`` raises QueueFull beyond that. ``max_len`` is the context each row holds
    (default: the model's, capped at 4096 to bound the cache's memory). ``draft`` (a model
    with the same tokenizer, a name/path, ``"self[:L]"``, ``"lookup[:N]"``) turns on
    speculative decoding for lone sequences with ``draft_tokens`` (K or ``"auto"``); raises
    InvalidArgument for a draft with another tokenizer or a bad K, before anything runs.
    """

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None,
                 draft=None, draft_tokens: int | str = "auto"):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model = model
        self.network = model.network
        self.tokenizer = model.tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = min(max_len or 4096, model.config.max_seq_len)
        self.cache = KVCache.allocate(
            model.config, max_batch, self.max_len, dtype=self.network.lm_head.weight.dtype
        )
        self.rows: list[_Slot | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.steps = 0  # decode steps run (for tests and metrics)
        KControl(draft_tokens)  # refuse a bad K now, not at the first request
        self.draft = None if draft is None else make_draft(model, draft, max_len=self.max_len)
        self.draft_tokens = draft_tokens
        self.spec = SpecStats(kind=self.draft.kind if self.draft else "")  # all requests'
        self._draft_owner: Request | None = None  # whose context the draft's cache holds
        self.on_step: Callable[[int, int], None] | None = None  # (batch rows, active) hook
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="pocketlm-scheduler", daemon=True)
        self._thread.start()

    # -- the public side (any thread) -------------------------------------------------------
    def check(self, prompt: list[int]) -> None:
        """Raise InvalidArgument/ContextOverflow if ``prompt`` cannot be served."""
        check_prompt(prompt, self.max_len)

    def submit(self, requests: list[Request]) -> None:
        """Queue ``requests`` together, or none of them: raises QueueFull when the queue
        would exceed ``max_queue``, and ContextOverflow/InvalidArgument for a bad prompt."""
        for r in requests:
            self.check(r.prompt)
            if r.draft_tokens is not None:
                KControl(r.draft_tokens)
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            free = self.rows.count(None)
            waiting = sum(not r.cancelled for r in self.waiting)
            if waiting + len(requests) - free > self.max_queue:
                raise QueueFull(
                    f"{waiting} requests are already waiting (max_queue={self.max_queue}); "
                    "retry shortly"
                )
            self.waiting.extend(requests)
            self._cond.notify()

    @property
    def queue_length(self) -> int:
        return sum(not r.cancelled for r in self.waiting)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.rows)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel everything still waiting or running and end the background thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- the loop (scheduler thread) --------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self.waiting and not self.active:
                        self._cond.wait()
                    if self._stopping:
                        break
                try:
                    self._admit()
                    self._step()
                except Exception:  # a bug must not take the server down: fail the batch
                    log.exception("scheduler step failed; failing the running requests")
                    for i, slot in enumerate(self.rows):
                        if slot is not None:
                            self._finish(i, "error")
        for i, slot in enumerate(self.rows):
            if slot is not None:
                self._finish(i, "cancelled")
        with self._cond:
            pending, self.waiting = list(self.waiting), deque()
        for r in pending:
            self._send(r, Token(r.index, -1, 0.0, "", "cancelled"))

    def _admit(self) -> None:
        """Give waiting requests the free rows (lowest first, to keep the batch short)."""
        while None in self.rows:
            with self._cond:
                if not self.waiting:
                    return
                r = self.waiting.popleft()
            if r.cancelled:
                self._send(r, Token(r.index, -1, 0.0, "", "cancelled"))
                continue
            if r.expired:
                self._send(r, Token(r.index, -1, 0.0, "", "timeout"))
                continue
            seq = SequenceState(r.index, r.prompt, r.params, self.tokenizer, self.max_len)
            if seq.limit <= 0:
                self._send(r, Token(r.index, -1, 0.0, "", "length"))
                continue
            slot = _Slot(r, seq)
            if self.draft is not None and r.speculative and r.constraint is None:
                slot.ctl = KControl(r.draft_tokens or self.draft_tokens)
                r.stats = SpecStats(kind=self.draft.kind)
            self.rows[self.rows.index(None)] = slot

    def _prefill(self) -> None:
        """Prefill up to PREFILL_CHUNK prompt tokens of the rows still reading their prompt.

        A long prompt is read in chunks between decode steps, so the sequences already
        decoding keep streaming while it loads; a row's last chunk yields its first token.
        """
        budget = PREFILL_CHUNK
        for i, slot in enumerate(self.rows):
            if budget <= 0:
                return
            if slot is None or slot.filled == len(slot.request.prompt):
                continue
            prompt = slot.request.prompt
            chunk = prompt[slot.filled : slot.filled + budget]
            try:
                logits = prefill(self.network, self.cache, i, chunk, start=slot.filled)
            except Exception:
                log.exception("prefill failed")
                self._finish(i, "error")
                continue
            slot.filled += len(chunk)
            budget -= len(chunk)
            if slot.filled == len(prompt):
                self._accept(i, slot, logits)

    def _step(self) -> None:
        for i, slot in enumerate(self.rows):  # leave before computing anything for them
            if slot is not None and (slot.request.cancelled or slot.request.expired):
                self._finish(i, "cancelled" if slot.request.cancelled else "timeout")
        self._prefill()
        live = [i for i, s in enumerate(self.rows) if s is not None and s.seq.out]
        if not live:
            return
        if len(live) == 1 and self.active == 1 and self.rows[live[0]].ctl is not None:
            return self._speculate(live[0], self.rows[live[0]])
        n = live[-1] + 1
        # Rows in 0..n-1 that are not decoding get a dummy token: a free row at position 0 (the
        # next prefill rewrites it), a row still reading its prompt at its next prompt position
        # (its next chunk rewrites it), so no cache entry that matters is touched.
        tokens = torch.zeros(n, dtype=torch.long)
        positions = torch.tensor([s.filled if s is not None else 0 for s in self.rows[:n]])
        for i in live:
            seq = self.rows[i].seq
            tokens[i], positions[i] = seq.out[-1], seq.pos
        logits = decode_step(self.network, self.cache, tokens, positions)  # (n, V)
        self.steps += 1
        if self.on_step:
            self.on_step(n, len(live))
        for i in live:
            slot = self.rows[i]
            slot.seq.pos += 1
            self._accept(i, slot, logits[i])

    def _speculate(self, row: int, slot: _Slot) -> None:
        """One speculative round for the lone active sequence; its Tokens go out one by one."""
        r, seq = slot.request, slot.seq
        if self._draft_owner is not r:  # the draft's cache holds another sequence's context
            self.draft.reset(self.max_len)
            self._draft_owner = r
        before = (r.stats.passes, r.stats.drafted, r.stats.accepted, r.stats.emitted)
        tokens = speculate_round(self.network, self.cache, row, seq, seq.prompt + seq.out,
                                 self.draft, slot.ctl, r.stats,
                                 plain=lambda t, pos: self._lone_step(row, t, pos))
        after = (r.stats.passes, r.stats.drafted, r.stats.accepted, r.stats.emitted)
        for f, b, a in zip(("passes", "drafted", "accepted", "emitted"), before, after):
            setattr(self.spec, f, getattr(self.spec, f) + a - b)
        self.steps += 1
        if self.on_step:
            self.on_step(row + 1, 1)
        for tok in tokens:
            self._send(r, tok)
        if seq.done:
            self.rows[row] = None

    def _lone_step(self, row: int, token: int, pos: int) -> torch.Tensor:
        """The fused one-token step for the only active row (rows below it are free: their
        dummy token at position 0 is rewritten by the next prefill); logits (V,)."""
        tokens = torch.zeros(row + 1, dtype=torch.long)
        positions = torch.zeros(row + 1, dtype=torch.long)
        tokens[row], positions[row] = token, pos
        return decode_step(self.network, self.cache, tokens, positions)[row]

    def _accept(self, row: int, slot: _Slot, logits: torch.Tensor) -> None:
        seq, c = slot.seq, slot.request.constraint
        if c is not None:
            allowed = c.allowed(seq.limit - len(seq.out))
            logits = logits.masked_fill(~allowed, float("-inf"))
        tok = seq.accept(logits)
        if c is not None:
            c.advance(tok.id)
            if c.complete and tok.finish_reason == "length":
                tok.finish_reason = seq.finish_reason = "stop"  # the value is whole: not cut
        self._send(slot.request, tok)
        if seq.done:
            self.rows[row] = None

    def _finish(self, row: int, reason: str) -> None:
        slot = self.rows[row]
        self.rows[row] = None
        slot.seq.finish_reason = reason
        self._send(slot.request, Token(slot.request.index, -1, 0.0, "", reason))

    def _send(self, r: Request, tok: Token) -> None:
        try:
            r.sink(tok)
        except Exception:  # a consumer that went away must not stop the others
            log.exception("could not deliver a token; cancelling that request")
            r.cancelled = True

"""The continuous-batching scheduler on its own: same tokens as Model.generate, rows reused,
long prompts read in chunks while others keep decoding, cancellation frees rows at once."""

from __future__ import annotations

import queue
import time

from tiny import make_tiny_model

from pocketlm.engine import scheduler as sched_mod
from pocketlm.engine.sampling import SamplingParams
from pocketlm.engine.scheduler import Request, Scheduler


def collect(q: queue.Queue, timeout: float = 30) -> tuple[str, list[int], str]:
    text, ids = "", []
    while True:
        t = q.get(timeout=timeout)
        text += t.text
        if t.id >= 0:
            ids.append(t.id)
        if t.finish_reason:
            return text, ids, t.finish_reason


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_more_requests_than_rows_all_match_generate():
    m = make_tiny_model(seed=2)
    s = Scheduler(m, max_batch=3, max_queue=10)
    prompts = [f"prompt {i} " * (i + 1) for i in range(7)]
    queues = [queue.Queue() for _ in prompts]
    s.submit(
        [
            Request(m.encode(p), greedy(10 + i), q.put, index=i)
            for i, (p, q) in enumerate(zip(prompts, queues))
        ]
    )
    got = [collect(q) for q in queues]
    s.stop()
    for i, (p, (text, ids, reason)) in enumerate(zip(prompts, got)):
        assert text == m.generate(p, max_tokens=10 + i, temperature=0, ignore_eos=True)
        assert len(ids) == 10 + i and reason == "length"
    assert s.active == 0 and s.queue_length == 0


def test_long_prompt_is_read_in_chunks_while_others_decode(monkeypatch):
    monkeypatch.setattr(sched_mod, "PREFILL_CHUNK", 64)
    m = make_tiny_model(seed=4, max_seq_len=1024)
    s = Scheduler(m, max_batch=2, max_len=1024)
    steps = []
    s.on_step = lambda n, active: steps.append(active)
    running = queue.Queue()
    s.submit([Request(m.encode("a"), greedy(200), running.put)])
    running.get(timeout=10)  # it is decoding
    long_prompt = "the quick brown fox jumps over the lazy dog. " * 10  # ~450 tokens
    ids = m.encode(long_prompt)
    assert len(ids) > 5 * 64
    long_q = queue.Queue()
    before = len(steps)
    s.submit([Request(ids, greedy(8), long_q.put)])
    first = long_q.get(timeout=30)
    # the running sequence got decode steps while the long prompt was read, chunk by chunk
    assert len(steps) - before >= len(ids) // 64 - 1
    text = first.text + collect(long_q)[0]
    assert text == m.generate(long_prompt, max_tokens=8, temperature=0, ignore_eos=True)
    s.stop()


def test_cancel_frees_the_row_and_stop_cancels_the_queue():
    m = make_tiny_model(seed=1)
    s = Scheduler(m, max_batch=1, max_queue=5)
    s.on_step = lambda n, active: time.sleep(0.005)
    a, b = queue.Queue(), queue.Queue()
    ra = Request(m.encode("x"), greedy(200), a.put)
    s.submit([ra, Request(m.encode("y"), greedy(3), b.put)])
    a.get(timeout=10)
    ra.cancel()
    assert collect(a)[2] == "cancelled"
    assert collect(b)[2] == "length"  # the queued one got the freed row
    c = queue.Queue()
    s.submit([Request(m.encode("z"), greedy(200), c.put)])
    s.stop()
    assert collect(c)[2] == "cancelled"

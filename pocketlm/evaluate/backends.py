"""What a task asks of a model, answered locally or by any OpenAI-compatible server.

Three requests, as lm-evaluation-harness names them:

- ``loglikelihood(items)``: for each (context, [continuation, ...]) the summed log-prob of each
  continuation and whether greedy decoding reproduces it.
- ``generate(prompts, until, max_gen_toks)``: greedy continuations, cut at the first stop string.
- ``token_logprobs(ids, mask)``: per-token log-probs of a tokenized text (perplexity).

``LocalLM`` runs on a loaded ``Model``: log-likelihoods through ``scoring.score_choices``
(each context once per batch) and generation through the engine's ``Scheduler`` — the same
continuous-batching decode loop the server uses, many sequences at once. ``EndpointLM`` asks
a server's ``/v1/completions``: with ``echo`` and ``logprobs`` for log-likelihoods (as lm-eval's
``local-completions`` does) and plainly for generation, several requests in flight so the
server can batch them.
"""

from __future__ import annotations

import json
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from pocketlm.errors import PocketError


class EndpointError(PocketError):
    """The endpoint could not be reached, refused a request, or lacks what a task needs."""


# -- local --------------------------------------------------------------------------------------
class LocalLM:
    """A loaded model: ``window`` is the context in tokens (longer contexts lose their oldest
    tokens, as in lm-eval), ``batch_size`` items score or decode together."""

    def __init__(self, model, window: int, batch_size: int = 8):
        self.model, self.window, self.batch_size = model, window, batch_size
        self.tokenizer = model.tokenizer

    def loglikelihood(self, items: list[tuple[str, list[str]]]) -> list[list[tuple[float, bool]]]:
        from pocketlm.evaluate import scoring
        from pocketlm.evaluate.run import _request

        reqs = [_request(self.tokenizer, c, conts, self.window) for c, conts in items]
        scored = scoring.score_choices(self.model.network, reqs)
        return [[(s.logprob, s.greedy) for s in row] for row in scored]

    def generate(
        self, prompts: dict[int, str], until: list[str], max_gen_toks: int,
        on_done: Callable[[int, str], None],
    ) -> None:
        """Greedy-decode every prompt through one Scheduler; ``on_done(key, text)`` is called
        on this thread as each finishes (any order), so results can be cached as they come."""
        from pocketlm.engine.sampling import SamplingParams
        from pocketlm.engine.scheduler import Request, Scheduler

        if not prompts:
            return
        sched = Scheduler(self.model, max_batch=self.batch_size, max_queue=len(prompts))
        keep = sched.max_len - max_gen_toks  # lm-eval: max_ctx_len = max_length - max_gen_toks
        if keep < 1:
            sched.stop()
            raise PocketError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in the "
                              f"{sched.max_len}-token context; lower max_gen_toks")
        params = SamplingParams(max_tokens=max_gen_toks, temperature=0.0, top_k=0, top_p=1.0,
                                min_p=0.0, stop=[s for s in until if s])
        done: queue.Queue = queue.Queue()
        texts: dict[int, list[str]] = {k: [] for k in prompts}

        def sink_for(key):
            def sink(tok):
                texts[key].append(tok.text)
                if tok.finish_reason is not None:
                    done.put((key, tok.finish_reason))
            return sink

        try:
            reqs = []
            for k, p in prompts.items():
                ids = self.tokenizer.encode(p)[-keep:] or [self.tokenizer.eos_id]
                reqs.append(Request(ids, params, sink_for(k)))
            sched.submit(reqs)
            for _ in range(len(reqs)):
                key, reason = done.get()
                if reason not in ("stop", "length"):
                    raise PocketError(f"generation ended with {reason!r}; see the log")
                text = "".join(texts[key])
                for s in until:  # the scheduler already stops there; lm-eval cuts the same way
                    if s:
                        text = text.split(s)[0]
                on_done(key, text)
        finally:
            sched.stop()

    @torch.inference_mode()
    def token_logprobs(self, ids: list[int], mask: list[bool]) -> list[float]:
        """log p(ids[t] | ids[:t]) for every t with mask[t] (t >= 1), windows of ``window``
        tokens, each conditioned on up to ``window`` tokens before it (disjoint, as lm-eval's
        rolling windows)."""
        from pocketlm.evaluate.perplexity import rolling_windows
        from pocketlm.evaluate.scoring import _target_logprobs

        net = self.model.network
        out, done = [], 1
        for span, n in rolling_windows(ids[1:], ids[0], self.window, self.window):
            h = net.hidden(torch.tensor([span[:-1]]))[0]  # (T, D)
            targets = torch.tensor(span[len(span) - n:])
            lp, _ = _target_logprobs(net, h[len(span) - 1 - n:], targets)
            for j, v in enumerate(lp.tolist()):
                if mask[done + j]:
                    out.append(v)
            done += n
        return out


# -- any OpenAI-compatible server ----------------------------------------------------------------
class EndpointLM:
    """``url`` is the server's base (``http://host:port`` or ``.../v1``); ``model`` the name it
    serves; ``concurrency`` requests are in flight at once."""

    def __init__(self, url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 600.0):
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.concurrency = max(1, concurrency)

    def _post(self, path: str, body: dict) -> dict:
        url = self.base + path
        req = urllib.request.Request(url, data=json.dumps({"model": self.model, **body}).encode(),
                                     headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:500]
            raise EndpointError(f"{url} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise EndpointError(f"cannot reach {url} ({reason}); is the server running, and is "
                                "--endpoint its base URL (e.g. http://127.0.0.1:8000)?") from None

    def check(self) -> None:
        """Fail early, naming the URL, when the server is down or does not serve ``model``."""
        url = self.base + "/models"
        try:
            req = urllib.request.Request(url)
            if self.api_key:
                req.add_header("Authorization", f"Bearer {self.api_key}")
            with urllib.request.urlopen(req, timeout=30) as r:
                ids = [m.get("id") for m in json.loads(r.read()).get("data", [])]
        except urllib.error.HTTPError:
            return  # some servers have no /models; the first real request will tell
        except (urllib.error.URLError, OSError) as e:
            raise EndpointError(f"cannot reach {url} ({getattr(e, 'reason', e)}); is the "
                                "server running?") from None
        if ids and self.model not in ids:
            raise EndpointError(f"{self.base} does not serve model {self.model!r}; it serves "
                                f"{', '.join(map(str, ids))} (pass one with --model)")

    def _map(self, fn, xs):
        with ThreadPoolExecutor(self.concurrency) as ex:
            return list(ex.map(fn, xs))

    def _echo(self, prompt: str) -> dict:
        """Echoed prompt with per-token log-probs (lm-eval local-completions' request)."""
        need = ("log-likelihood tasks (multiple_choice, loglikelihood, ppl:) need a server whose "
                "/v1/completions supports echo=true with logprobs (llama-server, vLLM); "
                "generative tasks (generate_until, gsm8k) work with any server")
        try:
            r = self._post("/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0,
                                            "logprobs": 1, "echo": True})
        except EndpointError as e:
            if "cannot reach" in str(e):
                raise
            raise EndpointError(f"{e}\n{need}") from None
        lp = (r.get("choices") or [{}])[0].get("logprobs") or {}
        if not lp.get("token_logprobs") or not lp.get("text_offset"):
            raise EndpointError(f"{self.base}/completions returned no echoed logprobs; {need}")
        return lp

    def loglikelihood(self, items: list[tuple[str, list[str]]]) -> list[list[tuple[float, bool]]]:
        pairs = [(c, cont) for c, conts in items for cont in conts]

        def one(pair):
            ctx, cont = pair
            lp = self._echo(ctx + cont)
            total, greedy = 0.0, True
            end = len(ctx) + len(cont)
            toks, offs = lp.get("tokens") or [], lp["text_offset"]
            tops = lp.get("top_logprobs") or [None] * len(offs)
            for j, off in enumerate(offs):
                if off < len(ctx) or off >= end or lp["token_logprobs"][j] is None:
                    continue
                total += lp["token_logprobs"][j]
                top = tops[j] if j < len(tops) else None
                if top and toks:
                    greedy &= max(top, key=top.get) == toks[j]
            return total, greedy

        flat = iter(self._map(one, pairs))
        return [[next(flat) for _ in conts] for _, conts in items]

    def generate(self, prompts: dict[int, str], until: list[str], max_gen_toks: int,
                 on_done: Callable[[int, str], None]) -> None:
        stops = [s for s in until if s]
        lock = threading.Lock()

        def one(key):
            r = self._post("/completions", {"prompt": prompts[key], "max_tokens": max_gen_toks,
                                            "temperature": 0, "stop": stops[:4] or None})
            text = (r.get("choices") or [{}])[0].get("text", "")
            for s in stops:
                text = text.split(s)[0]
            with lock:
                on_done(key, text)

        self._map(one, list(prompts))

    def text_logprobs(self, text: str) -> tuple[list[float], int]:
        """Log-probs of every echoed token of ``text`` after the first (which has no context)
        and the number of tokens."""
        lp = self._echo(text)
        vals = [v for v, off in zip(lp["token_logprobs"], lp["text_offset"])
                if v is not None and off < len(text)]
        return vals, len([o for o in lp["text_offset"] if o < len(text)])

"""``echo`` on ``/v1/completions``: the prompt's own tokens with their log-probs, in OpenAI's
legacy ``logprobs`` shape (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``),
as llama-server and vLLM return them. This is what log-likelihood evaluation over HTTP asks
for (lm-eval's ``local-completions``, pocketlm's ``eval --endpoint``).

The prompt is scored in one causal pass, outside the scheduler: no KV cache is kept and no
batch row is taken, so generation keeps its batching.
"""

from __future__ import annotations

import threading
import weakref

import torch

# One scoring pass per model at a time: requests come on executor threads, and several
# passes at once would only split two cores and hold their logits chunks side by side.
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock_for(model) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(model, threading.Lock())


def text_offsets(tokenizer, text: str | None, ids: list[int]) -> list[int]:
    """Character offset in the echoed text where each token starts.

    For a text prompt the tokenizer's own offsets are used, taking each token's start as the
    previous token's end (byte-level tokenizers trim a leading space from a token's offsets,
    which would misplace it; a BOS token is zero-width at 0). For a prompt of ids the offsets
    are the running length of the token texts.
    """
    if text is None:
        out, at = [], 0
        for i in ids:
            out.append(at)
            at += len(tokenizer.token_text(i))
        return out
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ends = [e for _, e in enc.offsets]
    lead = len(ids) - len(ends)  # a BOS the tokenizer prepends
    return [0] * lead + [0 if j == 0 else ends[j - 1] for j in range(len(ends))]


@torch.inference_mode()
def prompt_logprobs(model, ids: list[int], top: int, with_next: bool = False, chunk: int = 128):
    """log p(ids[t] | ids[:t]) for t >= 1 and the ``top`` most likely tokens at each t.

    Returns (logprobs [None, float, ...], tops [None, [(id, logprob), ...], ...], next): the
    first two of len(ids); ``next`` is, with ``with_next``, the greedy next token after the
    whole prompt from the same pass, (id, logprob, [(id, logprob), ...top]), else None.
    Logits are computed ``chunk`` positions at a time: (T, V) at once would be GBs for a long
    prompt and a 150k vocabulary (128 x 150k fp32 is 77 MB).
    """
    with _lock_for(model):
        return _prompt_logprobs(model, ids, top, with_next, chunk)


def _prompt_logprobs(model, ids, top, with_next, chunk):
    net = model.network
    lps: list[float | None] = [None]
    tops: list[list[tuple[int, float]] | None] = [None]
    seen = ids if with_next else ids[:-1]
    if not seen:
        return lps, tops, None
    h = net.hidden(torch.tensor([seen]))[0]  # (T or T-1, D)
    targets = torch.tensor(ids[1:])
    nxt = None
    for s in range(0, h.shape[0], chunk):
        lp = torch.log_softmax(net.lm_head(h[s : s + chunk]).float(), dim=-1)  # (m, V)
        if with_next and s + chunk >= h.shape[0]:  # the last row predicts past the prompt
            last = lp[-1]
            v, i = last.topk(max(top, 1))
            nxt = (int(i[0]), float(v[0]), list(zip(i.tolist(), v.double().tolist()))[:top])
            lp = lp[:-1]
        t = targets[s : s + len(lp)]
        lps += lp.gather(1, t[:, None])[:, 0].double().tolist()
        if top:
            v, i = lp.topk(top, dim=-1)
            tops += [list(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.double().tolist())]
        else:
            tops += [[] for _ in range(len(t))]
    return lps, tops, nxt


def echo_logprobs(model, text: str | None, ids: list[int], top: int, with_next: bool = False):
    """(the legacy ``logprobs`` object of the prompt, the first token without a log-prob;
    ``next`` as ``prompt_logprobs`` gives it)."""
    tok = model.tokenizer
    lps, tops, nxt = prompt_logprobs(model, ids, top, with_next)
    lp = {
        "tokens": [tok.token_text(i) for i in ids],
        "token_logprobs": lps,
        "top_logprobs": [
            None if t is None else {tok.token_text(i): lp for i, lp in t} for t in tops
        ],
        "text_offset": text_offsets(tok, text, ids),
    }
    return lp, nxt

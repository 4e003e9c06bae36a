"""WikiText-2 perplexity exactly as lm-evaluation-harness's ``wikitext`` task computes it.

1. Pages: the raw test file is split into Wikipedia articles the way the
   ``EleutherAI/wikitext_document_level`` dataset does it (a new page starts at a line that,
   after ``"= = ="`` -> ``"==="`` and ``"= ="`` -> ``"=="``, reads ``"= Title ="``).
2. Each page is detokenized with lm-eval's ``wikitext_detokenizer`` (``" @-@ "`` -> ``"-"``,
   spaces before punctuation removed, ...) and scored on its own with rolling windows: the
   first window starts from the prefix token (BOS, else EOS) and predicts up to ``context``
   tokens; each later window predicts the next ``stride`` tokens, conditioned on the
   ``context - stride`` tokens before them (plus one). ``stride == context`` (the default) is
   lm-eval's ``loglikelihood_rolling`` (``context_len=1``: disjoint windows).
3. Metrics over all pages, where ``ll`` is the summed natural-log likelihood:
   ``word_perplexity = exp(-sum ll / sum words)`` with words = ``len(re.split(r"\\s+", page))``
   of the page *before* detokenization; ``byte_perplexity = exp(-sum ll / sum bytes)`` and
   ``bits_per_byte = -sum ll / sum bytes / ln 2`` with the page's UTF-8 bytes (also before
   detokenization); ``token_perplexity = exp(-sum ll / sum tokens)`` (ours; depends on the
   tokenizer, so only comparable between models that share one).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator


def wikitext_pages(raw: str) -> list[str]:
    """Split a raw WikiText file into article pages (the document-level dataset's rule)."""
    pages, lines = [], []
    for line in raw.split("\n"):
        squashed = line.replace("= = =", "===").replace("= =", "==").strip()
        if squashed.startswith("= ") and squashed.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def wikitext_detokenizer(page: str) -> str:
    """lm-eval's detokenizer for WikiText (undoes its tokenisation artefacts)."""
    s = page
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ")
    s = s.replace(" 's", "'s")
    return s


def page_counts(page: str) -> tuple[int, int]:
    """(words, UTF-8 bytes) of a page before detokenization, as lm-eval counts them."""
    return len(re.split(r"\s+", page)), len(page.encode("utf-8"))


def rolling_windows(
    tokens: list[int], prefix_token: int, context: int, stride: int
) -> Iterator[tuple[list[int], int]]:
    """(span, n) windows covering ``tokens``: feed ``span[:-1]``, score its last ``n`` targets.

    Every token is scored exactly once. The first span is ``[prefix] + tokens[:context]``;
    later ones end ``stride`` tokens further and hold up to ``context + 1`` tokens. Equal to
    lm-eval's ``get_rolling_token_windows`` + ``make_disjoint_window`` with
    ``context_len = context - stride + 1``.
    """
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in 1..context ({context}), got {stride}")
    if not tokens:
        return
    first = min(context, len(tokens))
    yield [prefix_token] + tokens[:first], first
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, stride)
        end = done + n
        yield tokens[max(0, end - context - 1) : end], n
        done = end


def perplexity_metrics(rows: list[dict]) -> dict:
    """Aggregate per-page rows {"ll", "tokens", "words", "bytes"} into lm-eval's metrics."""
    ll = sum(r["ll"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    words = sum(r["words"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    return {
        "word_perplexity": math.exp(-ll / words),
        "byte_perplexity": math.exp(-ll / nbytes),
        "bits_per_byte": -ll / nbytes / math.log(2),
        "token_perplexity": math.exp(-ll / tokens),
        "loglikelihood": ll,
        "tokens": tokens,
        "words": words,
        "bytes": nbytes,
        "pages": len(rows),
    }

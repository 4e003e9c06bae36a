"""The server's Prometheus metrics, kept in a few dicts (no client library needed)."""

from __future__ import annotations

import threading

from pocketlm.engine.scheduler import Scheduler

_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))


class Metrics:
    """Counters and histograms, rendered as Prometheus text (no client library needed)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        self.hist: dict[tuple[str, str], list] = {}  # (metric, route) -> [bucket counts, sum, n]

    def count_request(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[route, status] = self.requests.get((route, status), 0) + 1

    def count_tokens(self, model: str, kind: str, n: int) -> None:
        with self.lock:
            self.tokens[model, kind] = self.tokens.get((model, kind), 0) + n

    def observe(self, metric: str, route: str, seconds: float) -> None:
        with self.lock:
            h = self.hist.setdefault((metric, route), [[0] * len(_BUCKETS), 0.0, 0])
            for i, b in enumerate(_BUCKETS):
                if seconds <= b:
                    h[0][i] += 1
            h[1] += seconds
            h[2] += 1

    def render(self, schedulers: dict[str, Scheduler]) -> str:
        out = [
            "# HELP pocketlm_requests_total HTTP requests by route and status code.",
            "# TYPE pocketlm_requests_total counter",
        ]
        with self.lock:
            for (route, code), n in sorted(self.requests.items()):
                out.append(f'pocketlm_requests_total{{route="{route}",code="{code}"}} {n}')
            for kind in ("prompt", "completion"):
                out += [
                    f"# HELP pocketlm_{kind}_tokens_total {kind.title()} tokens processed.",
                    f"# TYPE pocketlm_{kind}_tokens_total counter",
                ]
                for name in schedulers:
                    n = self.tokens.get((name, kind), 0)
                    out.append(f'pocketlm_{kind}_tokens_total{{model="{name}"}} {n}')
            for metric, help_ in (
                ("request_duration_seconds", "Time from request to last token."),
                ("time_to_first_token_seconds", "Time from request to first token."),
            ):
                out += [f"# HELP pocketlm_{metric} {help_}", f"# TYPE pocketlm_{metric} histogram"]
                for (m, route), (buckets, total, n) in sorted(self.hist.items()):
                    if m != metric:
                        continue
                    for b, c in zip(_BUCKETS, buckets):
                        le = "+Inf" if b == float("inf") else f"{b:g}"
                        out.append(f'pocketlm_{metric}_bucket{{route="{route}",le="{le}"}} {c}')
                    out.append(f'pocketlm_{metric}_sum{{route="{route}"}} {total:.6f}')
                    out.append(f'pocketlm_{metric}_count{{route="{route}"}} {n}')
        out += [
            "# HELP pocketlm_queue_length Requests waiting for a batch row.",
            "# TYPE pocketlm_queue_length gauge",
        ]
        out += [
            f'pocketlm_queue_length{{model="{k}"}} {s.queue_length}' for k, s in schedulers.items()
        ]
        out += [
            "# HELP pocketlm_active_sequences Sequences decoding now.",
            "# TYPE pocketlm_active_sequences gauge",
        ]
        out += [
            f'pocketlm_active_sequences{{model="{k}"}} {s.active}' for k, s in schedulers.items()
        ]
        for field, help_ in (("drafted", "Tokens drafted by speculative decoding."),
                             ("accepted", "Drafted tokens the target accepted.")):
            out += [f"# HELP pocketlm_speculative_{field}_tokens_total {help_}",
                    f"# TYPE pocketlm_speculative_{field}_tokens_total counter"]
            out += [f'pocketlm_speculative_{field}_tokens_total{{model="{k}"}} '
                    f"{getattr(s.spec, field)}" for k, s in schedulers.items() if s.draft]
        out += [
            "# HELP pocketlm_decode_steps_total Decode steps run (a speculative round counts one).",
            "# TYPE pocketlm_decode_steps_total counter",
        ]
        out += [
            f'pocketlm_decode_steps_total{{model="{k}"}} {s.steps}' for k, s in schedulers.items()
        ]
        return "\n".join(out) + "\n"

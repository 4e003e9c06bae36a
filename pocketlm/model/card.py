"""A model's card: where it came from, every step applied to it, every metric measured.

Saved as ``card.json`` beside the weights, with a ``README.md`` model card generated from it
(``readme``); a step appends itself with ``add_step`` and a measurement with ``add_metric``, so
a folder always says how it was made and how good it is. Metrics describe the weights as they
are: a step that changes them moves the metrics measured so far into its own entry
(``metrics_before``), so the lineage keeps every figure and the card never shows a float model's
quality under a quantized one's name.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

GEMMA_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at "
    "ai.google.dev/gemma/terms. This model is a Model Derivative of Gemma: those terms, "
    "including the use restrictions of the Gemma Prohibited Use Policy, apply to it and must be "
    "passed on to anyone it is shared with."
)
# the metrics shown per task in the README (the first ones present), most telling first
_SHOWN = ("word_perplexity", "acc_norm", "acc", "token_perplexity", "perplexity",
          "held_out_perplexity", "held_out_loss", "decode_tokens_per_s", "joules_per_token")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Card:
    name: str = ""
    source: str = ""  # where the weights came from: alias, file path, hub id
    source_sha256: str | None = None
    license: str | None = None
    steps: list[dict] = field(default_factory=list)  # {"step": "quantize", "settings": {...}, "time": ...}
    metrics: dict = field(default_factory=dict)  # {"wikitext2": {"word_perplexity": ...}, ...}
    licenses: list[str] = field(default_factory=list)  # of every other source (a distill teacher)

    def add_step(self, step: str, **settings) -> None:
        entry = {"step": step, "settings": settings, "time": _now()}
        if self.metrics:  # measured on the weights this step replaces
            entry["metrics_before"], self.metrics = self.metrics, {}
        self.steps.append(entry)

    def add_metric(self, task: str, values: dict) -> None:
        self.metrics[task] = {**values, "time": _now()}

    def all_licenses(self) -> list[str]:
        seen = [x for x in [self.license, *self.licenses] if x]
        return list(dict.fromkeys(seen))

    def save(self, folder: str | Path, config=None) -> None:
        """Write card.json and README.md into ``folder`` (each to a temp name, then renamed).

        ``config`` (a ModelConfig) adds the architecture and size to the README."""
        folder = Path(folder)
        _write(folder / "card.json", json.dumps(asdict(self), indent=2, default=str))
        _write(folder / "README.md", self.readme(folder, config))

    @classmethod
    def load(cls, folder: str | Path) -> Card:
        path = Path(folder) / "card.json"
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    # -- the generated model card ----------------------------------------------------------
    def readme(self, folder: str | Path | None = None, config=None) -> str:
        """The README.md model card: lineage, data, quality, size and speed, licences."""
        lic = self.all_licenses()
        gemma = any("gemma" in x.lower() for x in lic) or "gemma" in (self.source or "").lower()
        front = ["---", "library_name: pocketlm", "tags: [pocketlm]"]
        if lic:
            front.append(f"license: {'other' if gemma else _yaml_str(lic[0])}")
        front.append("---")
        out = front + ["", f"# {self.name or 'pocketlm model'}", ""]
        out.append(f"Made with pocketlm from `{self.source or '?'}`"
                   + (f" (sha256 `{self.source_sha256[:16]}…`)" if self.source_sha256 else "")
                   + ". Everything below is generated from `card.json`.")
        out += ["", "## Model", ""]
        if config is not None:
            out.append(f"- architecture: {config.arch}, {config.n_layers} layers, width "
                       f"{config.dim}, {config.n_heads} heads ({config.n_kv_heads} key/value), "
                       f"context {config.max_seq_len}")
            out.append(f"- parameters: {config.n_params / 1e6:.1f}M")
        if folder is not None:
            files = sorted(p for p in Path(folder).iterdir() if p.is_file()
                           and p.suffix in (".safetensors", ".gguf"))
            for p in files:
                out.append(f"- `{p.name}`: {p.stat().st_size / 1e6:.1f} MB")
        q = next((s["settings"] for s in reversed(self.steps) if s["step"] == "quantize"), None)
        if q:
            out.append(f"- weights: {q.get('method')} int{q.get('bits')}, group "
                       f"{q.get('group_size') or 'per row'}, {'symmetric' if q.get('sym') else 'asymmetric'}")
        out += ["", "## Lineage", ""]
        if not self.steps:
            out.append("No steps applied: the source model as it was loaded.")
        else:
            out += ["| # | step | settings | when |", "|---|---|---|---|"]
            for i, s in enumerate(self.steps, 1):
                out.append(f"| {i} | {s['step']} | {_settings_text(s['settings'])} | "
                           f"{s.get('time', '')} |")
        data = _data_used(self.steps)
        if data:
            out += ["", "## Data used", ""] + data
        out += ["", "## Quality and speed", ""]
        rows = _metric_rows("this model", self.metrics)
        for i, s in enumerate(self.steps, 1):
            rows += _metric_rows(f"before step {i} ({s['step']})", s.get("metrics_before", {}))
        if rows:
            out += ["| measured on | task | metric | value |", "|---|---|---|---|"] + rows
            machine = next((m.get("machine") for m in self.metrics.values()
                            if isinstance(m, dict) and m.get("machine")), None)
            if machine:
                out += ["", f"Speed and energy measured on: {machine}."]
        else:
            out.append("Not measured yet: `pocketlm eval FOLDER` records quality here.")
        out += ["", "## Licences", ""]
        if lic:
            out += [f"- {x}" for x in lic]
        else:
            out.append("- unknown: check the licence of the source model before sharing")
        if gemma:
            out += ["", GEMMA_NOTICE]
        return "\n".join(out) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _yaml_str(s: str) -> str:
    return s if s.replace("-", "").replace(".", "").isalnum() else json.dumps(s)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in list(v.items())[:4]) + (
            ", …}" if len(v) > 4 else "}")
    if isinstance(v, list) and len(v) > 4:
        return "[" + ", ".join(_short(x) for x in v[:4]) + ", …]"
    return str(v).replace("|", "\\|")


def _settings_text(settings: dict) -> str:
    skip = {"data", "calibration", "settings", "data_sha256"}
    parts = [f"{k}={_short(v)}" for k, v in settings.items() if k not in skip and v is not None]
    inner = settings.get("settings")
    if isinstance(inner, dict):  # training settings: the ones that matter most
        parts += [f"{k}={_short(inner[k])}" for k in ("steps", "tokens", "lr", "batch_size")
                  if inner.get(k) is not None]
    return ", ".join(parts).replace("|", "\\|") or "-"


def _data_used(steps: list[dict]) -> list[str]:
    lines = []
    for i, s in enumerate(steps, 1):
        st = s["settings"]
        for key in ("data", "calibration"):
            d = st.get(key)
            if not isinstance(d, dict):
                continue
            files = d.get("files") or [d.get("path") or d.get("file") or "?"]
            digest = d.get("sha256") or st.get("data_sha256")
            lines.append(f"- step {i} ({s['step']}) {key}: {', '.join(map(str, files))}"
                         + (f", {d['records']} records" if d.get("records") else "")
                         + (f", sha256 {_short(digest)}" if digest else ""))
    return lines


def _metric_rows(where: str, metrics: dict) -> list[str]:
    rows = []
    for task, m in metrics.items():
        if not isinstance(m, dict):
            continue
        for k in [k for k in _SHOWN if isinstance(m.get(k), (int, float))][:2]:
            rows.append(f"| {where} | {task} | {k} | {m[k]:.4g} |")
    return rows

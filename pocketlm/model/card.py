"""A model's card: where it came from, every step applied to it, every metric measured.

Saved as ``card.json`` beside the weights; a step appends itself with ``add_step`` and a
measurement with ``add_metric``, so a folder always says how it was made and how good it is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path


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

    def add_step(self, step: str, **settings) -> None:
        self.steps.append({"step": step, "settings": settings, "time": _now()})

    def add_metric(self, task: str, values: dict) -> None:
        self.metrics[task] = {**values, "time": _now()}

    def save(self, folder: str | Path) -> None:
        (Path(folder) / "card.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> Card:
        path = Path(folder) / "card.json"
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

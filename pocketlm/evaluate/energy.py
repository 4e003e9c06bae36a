"""Energy per generated token, and the CO2 it implies.

Two methods, and the result always says which one was used:

- ``rapl``: the CPU package energy counters Linux exposes under ``/sys/class/powercap``
  (Intel RAPL, also on recent AMD). Measured, for the whole package: other processes'
  work during the run is included, so run it on a quiet machine.
- ``estimate``: when the counters are absent or unreadable (containers, VMs, macOS), energy =
  CPU power at full load x the share of the CPU this process used, i.e.
  ``cpu_watts x process CPU seconds / logical cores``. This is codecarbon's fallback idea (TDP
  x utilisation) restricted to our own process. ``cpu_watts`` defaults to 15 W per logical
  core (at most 150 W); pass the package TDP for a better figure. Memory and idle power are
  not counted, so it is a lower bound of the wall-socket energy.

CO2 = energy x grid carbon intensity; the default 475 g CO2/kWh is the world-average figure
codecarbon also falls back to. Pass the local grid's value for a meaningful number.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Self

import torch

from pocketlm.errors import InvalidArgument

WORLD_GRID_G_PER_KWH = 475.0
RAPL_ROOT = Path("/sys/class/powercap")


def _rapl_zones() -> list[Path]:
    """Readable top-level package zones (intel-rapl:0, intel-rapl:1, ...)."""
    zones = []
    for z in sorted(RAPL_ROOT.glob("*rapl:[0-9]")) if RAPL_ROOT.is_dir() else []:
        try:
            int((z / "energy_uj").read_text())
            zones.append(z)
        except (OSError, ValueError):
            continue
    return zones


class EnergyMeter:
    """Measure joules over a ``with`` block: ``with EnergyMeter() as m: ...; m.joules``."""

    def __init__(self, cpu_watts: float | None = None, method: str = "auto"):
        if method not in ("auto", "rapl", "estimate"):
            raise InvalidArgument(f"method must be auto, rapl or estimate, got {method!r}")
        self.zones = _rapl_zones() if method in ("auto", "rapl") else []
        if method == "rapl" and not self.zones:
            raise InvalidArgument(f"no readable RAPL counters under {RAPL_ROOT}; use the estimate")
        self.cores = os.cpu_count() or 1
        if cpu_watts is not None and cpu_watts <= 0:
            raise InvalidArgument(f"cpu_watts must be positive, got {cpu_watts}")
        self.cpu_watts = cpu_watts or min(15.0 * self.cores, 150.0)
        self.method = "rapl" if self.zones else "estimate"
        self.joules = 0.0
        self.seconds = 0.0

    def describe(self) -> str:
        if self.method == "rapl":
            names = ", ".join(z.name for z in self.zones)
            return f"rapl: CPU package energy counters ({names}), whole package"
        return (f"estimate: {self.cpu_watts:.0f} W CPU power x this process's CPU time / "
                f"{self.cores} logical cores (no RAPL counters readable)")

    def _read(self) -> tuple[list[int], float]:
        if self.zones:
            return [int((z / "energy_uj").read_text()) for z in self.zones], 0.0
        t = os.times()
        return [], t.user + t.system

    def __enter__(self) -> Self:
        self._t0 = time.perf_counter()
        self._start = self._read()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        counters, cpu_s = self._read()
        if self.zones:
            total = 0
            for z, a, b in zip(self.zones, self._start[0], counters):
                if b < a:  # the counter wrapped around
                    b += int((z / "max_energy_range_uj").read_text())
                total += b - a
            self.joules = total / 1e6
        else:
            self.joules = self.cpu_watts * (cpu_s - self._start[1]) / self.cores


def co2_grams(joules: float, grid_g_per_kwh: float = WORLD_GRID_G_PER_KWH) -> float:
    return joules / 3.6e6 * grid_g_per_kwh


@torch.inference_mode()
def measure_generation(
    network,
    new_tokens: int = 128,
    batch_size: int = 1,
    prompt_tokens: int = 16,
    grid_g_per_kwh: float | None = None,
    cpu_watts: float | None = None,
    method: str = "auto",
) -> dict:
    """Energy of ``new_tokens`` decode steps for ``batch_size`` sequences (engine decode loop).

    Returns joules per token, grams of CO2 per 1,000 tokens, the method and its inputs.
    Raises InvalidArgument for non-positive sizes or a forced method that is unavailable.
    """
    from pocketlm.engine.generate import decode_step, prefill
    from pocketlm.model.transformer import KVCache

    if new_tokens < 1 or batch_size < 1:
        raise InvalidArgument("new_tokens and batch_size must be at least 1")
    grid = WORLD_GRID_G_PER_KWH if grid_g_per_kwh is None else grid_g_per_kwh
    if grid < 0:
        raise InvalidArgument(f"grid intensity must be >= 0 g/kWh, got {grid}")
    cfg = network.config
    cache = KVCache.allocate(cfg, batch_size, prompt_tokens + new_tokens + 1,
                             network.lm_head.weight.dtype)
    g = torch.Generator().manual_seed(0)
    for b in range(batch_size):
        prefill(network, cache, b, torch.randint(100, min(cfg.vocab_size, 20000),
                                                 (prompt_tokens,), generator=g).tolist())
    tokens = torch.full((batch_size,), 100)
    meter = EnergyMeter(cpu_watts=cpu_watts, method=method)
    with meter:
        for i in range(new_tokens):
            positions = torch.full((batch_size,), prompt_tokens + i)
            logits = decode_step(network, cache, tokens, positions)
            tokens = logits.argmax(-1)
    n = new_tokens * batch_size
    jpt = meter.joules / n
    return {
        "joules_per_token": jpt,
        "g_co2_per_1k_tokens": co2_grams(jpt * 1000, grid),
        "grid_g_co2_per_kwh": grid,
        "tokens": n,
        "seconds": meter.seconds,
        "tokens_per_s": n / meter.seconds if meter.seconds else float("nan"),
        "method": meter.describe(),
        "method_kind": meter.method,
        "cpu_watts": meter.cpu_watts if meter.method == "estimate" else None,
    }

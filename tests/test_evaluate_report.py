"""Energy per token and the multi-model report, on tiny models."""

from __future__ import annotations

import json

import pytest
from test_evaluate import data_dir  # noqa: F401 - the shared task-data fixture
from tiny import make_tiny_model

from pocketlm.errors import InvalidArgument
from pocketlm.evaluate import energy
from pocketlm.evaluate.energy import EnergyMeter, co2_grams, measure_generation
from pocketlm.evaluate.report import pareto


def test_the_estimate_is_cpu_power_times_our_cpu_share(monkeypatch):
    monkeypatch.setattr(energy, "_rapl_zones", list)
    times = iter([(10.0, 1.0), (13.0, 2.0)])  # (user, system) CPU seconds before and after

    class T:
        def __init__(self, u, s):
            self.user, self.system = u, s

    monkeypatch.setattr(energy.os, "times", lambda: T(*next(times)))
    monkeypatch.setattr(energy.os, "cpu_count", lambda: 4)
    with EnergyMeter(cpu_watts=40.0) as m:
        pass
    assert m.method == "estimate" and "40 W" in m.describe() and "4 logical cores" in m.describe()
    assert m.joules == pytest.approx(40.0 * 4.0 / 4)  # 4 CPU-seconds on a 4-core, 40 W package


def test_rapl_counters_are_read_and_wraparound_handled(monkeypatch, tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("999000000\n")
    (zone / "max_energy_range_uj").write_text("1000000000\n")
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path)
    meter = EnergyMeter()
    assert meter.method == "rapl"
    with meter:
        (zone / "energy_uj").write_text("2000000\n")  # wrapped: 1 J to the top, then 2 J
    assert meter.joules == pytest.approx(3.0)


def test_co2_follows_the_grid_intensity():
    assert co2_grams(3.6e6, 475.0) == pytest.approx(475.0)  # 1 kWh on the world-average grid
    assert co2_grams(3.6e6, 20.0) == pytest.approx(20.0)


def test_generation_energy_names_its_method_and_refuses_bad_values():
    net = make_tiny_model().network
    r = measure_generation(net, new_tokens=4, batch_size=2, grid_g_per_kwh=100.0)
    assert r["tokens"] == 8 and r["joules_per_token"] >= 0
    assert r["g_co2_per_1k_tokens"] == pytest.approx(co2_grams(r["joules_per_token"] * 1000, 100))
    assert r["method"].split(":")[0] in ("rapl", "estimate")
    with pytest.raises(InvalidArgument):
        measure_generation(net, new_tokens=0)
    with pytest.raises(InvalidArgument):
        measure_generation(net, grid_g_per_kwh=-1)


def test_pareto_front():
    # (size, quality): the middle model is beaten by the first on both counts.
    assert pareto([(10, 50), (20, 40), (30, 60)], "lower") == [0, 2]
    assert pareto([(10, 50), (20, 40), (30, 60)], "higher") == [2]


def test_report_compares_saved_models(tmp_path, data_dir, monkeypatch):  # noqa: F811
    from pocketlm.cli import main

    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))  # the item cache goes here

    a = make_tiny_model(seed=0).save(tmp_path / "tiny-a")
    b = make_tiny_model(seed=1, hidden_dim=64).save(tmp_path / "tiny-b")
    out = tmp_path / "report"
    rc = main(["report", str(a), str(b), "-o", str(out), "--tasks", "hellaswag,wikitext2",
               "--limit", "3", "--pages", "1", "--data-dir", str(data_dir), "--threads", "1"])
    assert rc == 0
    md = (out / "report.md").read_text()
    assert "tiny-a" in md and "tiny-b" in md and "hellaswag acc_norm %" in md
    assert "J/token" in md and "pareto_size.png" in md
    assert "<table>" in (out / "report.html").read_text()
    rows = json.loads((out / "report.json").read_text())["models"]
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["disk_bytes"] < rows[0]["disk_bytes"]
    for png in ("pareto_size.png", "pareto_speed.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_energy_reports_its_method(tmp_path, capsys):
    from pocketlm.cli import main

    folder = make_tiny_model().save(tmp_path / "tiny")
    assert main(["energy", str(folder), "--new-tokens", "4", "--grid-intensity", "50",
                 "--json", "--threads", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["grid_g_co2_per_kwh"] == 50 and r["tokens"] == 4
    assert r["method_kind"] in ("rapl", "estimate") and r["method"]


def test_each_model_memory_is_measured_on_its_own(tmp_path):
    """A big parent, and a big model measured first, do not set a small model's peak RSS."""
    import resource

    import torch

    from pocketlm.engine.bench import peak_rss_bytes
    from pocketlm.evaluate.report import _measure_isolated, measure_speed_memory

    big = make_tiny_model(seed=0, dim=512, n_heads=8, n_kv_heads=4, hidden_dim=2048,
                          n_layers=4).save(tmp_path / "big")  # ~64 MB of fp32 weights
    small = make_tiny_model(seed=1).save(tmp_path / "small")
    ballast = torch.ones(256 * 2**20)  # 1 GiB, touched: the parent's high-water mark
    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak_rss_bytes() >= ballast.numel() * 4
    big_row = _measure_isolated(measure_speed_memory, (str(big), 1))
    small_row = _measure_isolated(measure_speed_memory, (str(small), 1))
    assert small_row["weight_bytes"] < big_row["weight_bytes"]
    # Each child's peak is its own: far below the 1 GiB parent, the small below the big.
    assert small_row["peak_rss_bytes"] < parent_peak - 2**29
    assert small_row["peak_rss_bytes"] < big_row["peak_rss_bytes"] - 2**25
    del ballast

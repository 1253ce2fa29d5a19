"""Scenario comparison and the self-contained HTML report, checked as text and as a person sees it (Chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from stopstorm.cli import main
from stopstorm.metrics.report.compare import (
    compare,
    format_table,
    load_scenarios,
    noise_warning,
    run_scenario,
    scenario_figures,
)
from stopstorm.metrics.report.html_page import render_html, write_html_report
from stopstorm.metrics.report.model import Report, report_from_json


def _dist(p50: float, p95: float, p99: float) -> dict:
    return {"count": 10, "p50": p50, "p90": p95, "p95": p95, "p99": p99, "max": p99, "mean": p50}


def _report(qw50: float, goodput: float, zombie: float, scenario: str) -> dict:
    """A report-shaped document with made-up figures (test data, not a measurement)."""
    f = {"queue_wait": {"value": _dist(qw50, qw50 * 2, qw50 * 3), "unit": "s", "source": "simulator ledger"},
         "goodput_rate": {"value": goodput, "unit": "tokens/s", "source": "client records"},
         "goodput_tokens": {"value": goodput * 10, "unit": "tokens", "source": "client records"},
         "wasted_tokens": {"value": 100 if zombie else 0, "unit": "tokens", "source": "simulator ledger"},
         "zombie_slot_seconds": {"value": zombie, "unit": "slot-s", "source": "simulator ledger"}}
    cells = [{"stack": s, "close_mode": m, "figures": {"abort_latency": {
        "value": _dist(lat, lat * 1.1, lat * 1.2), "unit": "s", "source": "simulator ledger"}}}
        for s, m, lat in (("requests", "close", 0.015), ("openai", "hold", 1.0), ("httpx", "drop", 0.016))]
    timeline = [[t / 10, min(2, t % 5), max(0, t % 7 - 2)] for t in range(100)]
    replay_pol = {p: {"queue_wait": _dist(qw50 * k, qw50 * 2 * k, qw50 * 3 * k), "ttft": _dist(.1, .2, .3),
                      "generated_tokens": 1000 * k, "wasted_tokens": 0, "slot_seconds": 9.0 * k,
                      "goodput_tok_s": goodput, "throughput_tok_s": goodput * k}
                  for p, k in (("recorded", 1), ("perfect", 0.8), ("full", 1.5))}
    return {"meta": {"scenario": scenario, "host": "http://127.0.0.1:1", "duration_s": 10.0},
            "sources": ["simulator ledger"], "cells": cells, "overall": {"figures": f},
            "capacity": {"max_num_seqs": 2, "timeline": {"columns": ["t_s", "running", "waiting"], "rows": timeline},
                         "queue_wait_samples_s": [qw50 * (0.5 + i / 9) for i in range(10)],  # p50 = qw50
                         "ttft": {"value": _dist(.1, .2, .3)}, "throughput": {"value": goodput * 1.2},
                         "replay": {"policies": replay_pol, "step_timing": {"base_s": .015, "source": "test data"},
                                    "queue_wait_saved_s": {"p50": 0.1, "p95": 0.2, "mean": 0.1}}}}


# A made-up `gpu` section in the shape the GPU sampler writes (test data, not a measurement).
GPU_STAND_IN = {"timeline": {"columns": ["t_s", "gpu", "util_pct", "power_w", "energy_j", "mem_used_bytes",
                                         "sm_clock_mhz"],
                             "rows": [[t / 2, 0, 50 + 40 * ((t // 4) % 2), 150 + 100 * ((t // 4) % 2), 200.0 * t,
                                       1e9, 1500] for t in range(20)]},
                "stop_marks_s": [1.0, 3.5, 6.0]}


def test_compare_table_shows_figures_and_queue_wait_saved(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = tmp_path / "zombies.json", tmp_path / "prompt.json"
    a.write_text(json.dumps(_report(1.0, 100.0, 5.0, "zombies")))
    b.write_text(json.dumps(_report(0.4, 120.0, 0.0, "prompt aborts")))
    docs = load_scenarios([str(a), str(b)])
    table = format_table(docs)
    # Each value with the requests behind it; the difference in words, never a signed "saved" delta
    assert "| queue wait p50 (s) | 1.000 (n 10) | 0.400 (n 10) |" in table
    assert "| zombie slot-seconds | 5.00 | 0.00 |" in table
    assert "prompt aborts waits 0.600 s less than zombies at p50 (0.400 vs 1.000, -60 %); 95 % interval" in table
    assert "prompt aborts' zombies hold 5.00 slot-s less than zombies' (0.00 vs 5.00, -100 %)" in table
    assert "saved" not in table
    assert "energy per delivered token (J) | – | – |" in table  # no gpu section: unknown, not 0
    assert "Short single runs (zombies 10 s, prompt aborts 10 s)" in table  # no noise estimate for the rest
    assert main(["compare", str(a), str(b), "--replay", "--html", str(tmp_path / "cmp.html")]) == 0
    out = capsys.readouterr().out
    assert "zombies (replay: perfect)" in out and "prompt aborts (replay: full)" in out
    assert (tmp_path / "cmp.html").read_text().count("<svg") >= 3


def test_a_difference_inside_its_noise_is_said_to_be(tmp_path: Path) -> None:
    """Two runs of one server drawn from the same waits: the bootstrap interval spans 0 and the words say so."""
    import random

    rng = random.Random(7)
    paths = []
    for name in ("a", "b"):
        doc = _report(1.0, 100.0, 0.0, name)
        samples = sorted(rng.expovariate(1.0) for _ in range(60))  # test data: one distribution for both
        d = {"count": 60, "p50": samples[30], "p90": samples[54], "p95": samples[57], "p99": samples[59],
             "max": samples[59], "mean": sum(samples) / 60}
        doc["capacity"]["queue_wait_samples_s"] = samples
        doc["overall"]["figures"]["queue_wait"]["value"] = d
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(doc))
        paths.append(str(path))
    a, b = load_scenarios(paths)
    c = compare(a, b, "queue_wait_p50")
    assert c is not None and c.interval is not None and c.interval[0] < 0 < c.interval[1]
    assert c.within_noise and c.words(3).endswith(": within noise") and "n 60 vs 60" in c.words(3)
    assert compare(a, a, "queue_wait_p95").words(3).startswith("a: queue wait p95 (s) the same as a")


def test_reports_of_one_scenario_are_repeats_pooled_with_their_spread(tmp_path: Path) -> None:
    paths = []
    for k, (qw, good) in enumerate(((1.0, 100.0), (1.2, 110.0), (0.4, 150.0), (0.5, 160.0))):
        path = tmp_path / f"r{k}.json"
        path.write_text(json.dumps(_report(qw, good, 0.0, "zombies" if k < 2 else "prompt")))
        paths.append(str(path))
    zombies, prompt = load_scenarios(paths)
    assert (zombies.label, prompt.label) == ("zombies", "prompt") and len(zombies.repeats) == 2
    assert zombies.figures["goodput"] == pytest.approx(105.0)  # the median of the repeats
    assert zombies.counts["queue_wait_p50"] == 20 and len(zombies.samples["queue_wait_p50"]) == 20  # pooled
    c = compare(zombies, prompt, "goodput")
    assert c is not None and c.spread == (150.0, 160.0) and not c.within_noise  # the repeats do not overlap
    assert "repeats 150.0 to 160.0" in c.words(1)
    assert noise_warning([zombies, prompt]) is None  # repeated: their spread is the noise estimate


def test_compare_names_a_bad_report(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match=r"bad\.json is not a stopstorm report"):
        load_scenarios([str(bad)])


def _read(doc: dict) -> Report:
    return report_from_json(doc)


def test_energy_per_delivered_token_is_the_gpu_sections_energy_figure() -> None:
    energy = {"value": 5000.0, "unit": "J", "source": "NVML", "note": "Δ total-energy counter"}
    report = _read({**_report(1.0, 100.0, 0.0, "x"), "gpu": {**GPU_STAND_IN, "energy": energy}})
    # the section's run-window energy, 5000 J, over 1000 delivered tokens (not the timeline's 3800 J)
    assert scenario_figures(report)["energy_per_delivered_token"] == pytest.approx(5.0)
    # One place for the energy figure: without it the comparison says unknown, it does not derive its own
    assert scenario_figures(_read({**_report(1.0, 100.0, 0.0, "x"), "gpu": GPU_STAND_IN}))[
        "energy_per_delivered_token"] is None


def test_html_is_self_contained(tmp_path: Path) -> None:
    report = _read({**_report(1.0, 100.0, 5.0, "zombies"), "gpu": GPU_STAND_IN})
    page = render_html([run_scenario(report)])
    assert page.count("<svg") == 4  # timeline, queue-wait CDF, abort latency, GPU
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from anywhere
    assert "What early aborts bought" in page and "GPU utilisation and power" in page
    path = write_html_report(tmp_path / "run.json", report)
    assert path == tmp_path / "run.html" and path.read_text().startswith("<!DOCTYPE html>")
    no_gpu = render_html([run_scenario(_read(_report(1.0, 100.0, 5.0, "zombies")))])
    assert "GPU utilisation" not in no_gpu and no_gpu.count("<svg") == 3


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# Matplotlib's default colours (tab:…) as the screenshot shows them: each must appear, or a plot is missing.
_COLOURS = {"running (tab:blue)": (0x1F, 0x77, 0xB4), "waiting (tab:orange)": (0xFF, 0x7F, 0x0E),
            "p99 / Stop marks (tab:red)": (0xD6, 0x27, 0x28), "GPU util (tab:green)": (0x2C, 0xA0, 0x2C),
            "GPU power (tab:purple)": (0x94, 0x67, 0xBD)}


def test_html_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from PIL import Image

    page = write_html_report(tmp_path / "run.json", _read({**_report(1.0, 100.0, 5.0, "zombies"), "gpu": GPU_STAND_IN}))
    shot = tmp_path / "run.png"
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1200,3200",
             page.as_uri()], capture_output=True, text=True, timeout=90, check=False)
    assert shot.exists(), proc.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 3200)
    counts: dict[tuple[int, int, int], int] = {}
    for n, px in img.getcolors(maxcolors=1 << 24) or []:
        counts[px] = n
    non_white = sum(n for px, n in counts.items() if px != (255, 255, 255))
    assert non_white > 0.02 * img.size[0] * img.size[1]  # not a blank page

    def seen(rgb: tuple[int, int, int]) -> int:
        return sum(n for px, n in counts.items() if all(abs(a - b) <= 12 for a, b in zip(px, rgb, strict=True)))

    missing = [name for name, rgb in _COLOURS.items() if seen(rgb) < 50]
    assert not missing, f"plots missing from the rendered page: {missing}"
    # Keep the screenshot for a person to look at when asked (STOPSTORM_KEEP_SCREENSHOT=DIR).
    keep = os.environ.get("STOPSTORM_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, Path(keep) / "html-report.png")


def test_the_page_never_overwrites_locust_s_own_html(tmp_path: Path) -> None:
    from stopstorm.metrics.report.html_page import html_path_for

    assert html_path_for(tmp_path / "r.json") == tmp_path / "r.html"
    assert html_path_for(tmp_path / "r.json", taken=tmp_path / "r.html") == tmp_path / "r.stopstorm.html"
    assert html_path_for(tmp_path / "r.json", taken=tmp_path / "locust.html") == tmp_path / "r.html"


def test_the_comparison_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    """The page `stopstorm compare --html` writes: the table, the sentences and both runs' plots."""
    from browser_tools import colour_counts, keep_screenshot, screenshot, seen

    a, b = tmp_path / "zombies.json", tmp_path / "prompt.json"
    a.write_text(json.dumps(_report(1.0, 100.0, 5.0, "zombies")))
    b.write_text(json.dumps(_report(0.4, 120.0, 0.0, "prompt aborts")))
    assert main(["compare", str(a), str(b), "--replay", "--html", str(tmp_path / "cmp.html")]) == 0
    page = (tmp_path / "cmp.html").read_text()
    assert 'id="compare"' in page and "prompt aborts waits 0.600 s less than zombies at p50" in page
    shot = screenshot((tmp_path / "cmp.html").as_uri(), tmp_path / "cmp.png", (1200, 3600))
    counts = colour_counts(shot)
    assert seen(counts, (0xF0, 0xF0, 0xF0), tol=2) > 5_000  # the table's header cells
    missing = [name for name, rgb in _COLOURS.items() if "GPU" not in name and seen(counts, rgb) < 50]
    assert not missing, f"plots missing from the comparison page: {missing}"
    keep_screenshot(shot, "compare.png")

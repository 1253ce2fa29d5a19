"""One self-contained HTML page per run (or per comparison), written next to the JSON report.

A person opens it with no tool and no network: plots are matplotlib (Agg) SVG inlined in the page, tables are
plain HTML, nothing is fetched. What it shows, where the report has it:

- running and waiting requests over time (the `capacity` section's ledger timeline);
- the queue-wait CDF, one line per scenario (several reports on one page when comparing);
- abort latency per client stack × close mode (p50 and p99 bars, log scale: a step and a held socket differ
  by 100×);
- GPU utilisation and power over time with every Stop marked (the optional `gpu` section);
- the replay's counterfactual (queue wait saved by early aborts) and the accounting figures as tables.

`render_html(scenarios)` is pure (a run is one scenario: `run_scenario(report)`); `write_html_report(json_path,
report)` writes `<json stem>.html` beside the JSON. A writer over Reports: it computes nothing they do not hold.
"""

from __future__ import annotations

import html
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
from matplotlib.figure import Figure as PlotFigure

from stopstorm.metrics.analysis.replay import ReplayResult
from stopstorm.metrics.figures import Distribution
from stopstorm.metrics.redact import redact
from stopstorm.metrics.report.compare import FIGURES, Scenario, run_scenario
from stopstorm.metrics.report.model import Report

__all__ = ["html_path_for", "render_html", "write_html_report"]

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1100px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; } .note { color: #666; font-size: .85em; } figure { margin: .5em 0; }
.plot svg { max-width: 100%; height: auto; }
"""


def _svg(fig: PlotFigure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.find("<svg"):]  # drop the XML prolog and doctype: the page is HTML


def _figure_html(svg: str, caption: str) -> str:
    return f'<figure class="plot">{svg}<figcaption class="note">{html.escape(caption)}</figcaption></figure>'


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:,}" if isinstance(v, int) else f"{v:,.{digits}f}"


def _runs(scenarios: Sequence[Scenario]) -> list[tuple[str, Report]]:
    """The scenarios that are runs of their own (a replay policy has no timeline, cells or GPU)."""
    return [(s.label, s.report) for s in scenarios if s.report is not None]


# --- plots ---------------------------------------------------------------------------------------------------


def _timeline_plot(scenarios: Sequence[Scenario]) -> str | None:
    runs = [(label, r.capacity) for label, r in _runs(scenarios)
            if r.capacity is not None and r.capacity.timeline.rows]
    if not runs:
        return None
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.6 * len(runs)), squeeze=False)
    for ax, (label, cap) in zip(axes[:, 0], runs, strict=True):
        rows = cap.timeline.rows
        t = [r[0] for r in rows]
        many = len(rows) > 5000  # hours of traffic: draw the lines as an inline bitmap, not 10⁵ SVG vertices
        ax.step(t, [r[1] for r in rows], where="post", label="running", color="tab:blue", rasterized=many)
        ax.step(t, [r[2] for r in rows], where="post", label="waiting", color="tab:orange", rasterized=many)
        if cap.max_num_seqs:
            ax.axhline(cap.max_num_seqs, color="grey", ls=":", lw=1, label="max_num_seqs")
        ax.set_title(label, fontsize=10, loc="left")
        ax.set_ylabel("requests")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since run start")
    fig.tight_layout()
    return _figure_html(_svg(fig), "Running and waiting requests over time (server truth: the simulator ledger).")


def _cdf_plot(scenarios: Sequence[Scenario]) -> str | None:
    series = [(label, r.capacity.queue_wait_samples_s) for label, r in _runs(scenarios)
              if r.capacity is not None and r.capacity.queue_wait_samples_s]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for name, samples in series:
        xs = sorted(samples)
        ys = [(k + 1) / len(xs) for k in range(len(xs))]
        ax.step([x * 1e3 for x in xs], ys, where="post", label=f"{name} (n={len(xs)})")
    ax.set_xlabel("queue wait (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _figure_html(_svg(fig), "Queue wait CDF per scenario: arrival to admission into a running slot.")


def _abort_latency_plot(scenarios: Sequence[Scenario]) -> str | None:
    bars: list[tuple[str, float, float]] = []
    runs = _runs(scenarios)
    for label, r in runs:
        prefix = f"{label}: " if len(runs) > 1 else ""
        for cell in r.accounting.cells:
            lat = cell.figures.abort_latency.value
            if isinstance(lat, Distribution):
                bars.append((f"{prefix}{cell.stack} × {cell.close_mode}", lat.p50 * 1e3, lat.p99 * 1e3))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(bars) + 1.2))
    ys = range(len(bars))
    ax.barh([y + 0.2 for y in ys], [b[1] for b in bars], height=0.4, label="p50", color="tab:blue")
    ax.barh([y - 0.2 for y in ys], [b[2] for b in bars], height=0.4, label="p99", color="tab:red")
    ax.set_yticks(list(ys), [b[0] for b in bars], fontsize=8)
    ax.invert_yaxis()
    lo, hi = min(b[1] for b in bars), max(b[2] for b in bars)
    if lo > 0 and hi / lo > 20:  # a step and a held socket differ by 100×: only then a log scale
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("Stop → slot freed (ms, log scale)")
    else:
        ax.set_xlabel("Stop → slot freed (ms)")
    ax.grid(axis="x", alpha=.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _figure_html(_svg(fig), "Abort latency per client stack × close mode (server truth).")


def _gpu_plot(label: str, report: Report) -> str | None:
    gpu = report.gpu
    if gpu is None or not gpu.timeline.rows or "t_s" not in gpu.timeline.columns:
        return None
    rows = gpu.timeline.rows
    ix = {c: k for k, c in enumerate(gpu.timeline.columns)}
    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax2 = ax.twinx()
    for g in sorted({r[ix["gpu"]] for r in rows} if "gpu" in ix else {0}):
        mine = [r for r in rows if "gpu" not in ix or r[ix["gpu"]] == g]
        t = [r[ix["t_s"]] for r in mine]
        if "util_pct" in ix:
            ax.plot(t, [r[ix["util_pct"]] for r in mine], color="tab:green", label=f"GPU {g} utilisation %")
        if "power_w" in ix:
            ax2.plot(t, [r[ix["power_w"]] for r in mine], color="tab:purple", label=f"GPU {g} power W")
    for k, s in enumerate(gpu.stop_marks_s):
        ax.axvline(s, color="tab:red", lw=1.2, ls="--", label="Stop" if k == 0 else None)
    ax.set_xlabel("seconds since run start")
    ax.set_ylabel("utilisation %")
    ax.set_ylim(0, 105)
    ax2.set_ylabel("power (W)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    ax.set_title(label, fontsize=10, loc="left")
    fig.tight_layout()
    return _figure_html(_svg(fig), "GPU utilisation and power over time; red lines: users' Stops.")


# --- tables --------------------------------------------------------------------------------------------------


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _summary_table(scenarios: Sequence[Scenario]) -> str:
    rows = [[label] + [_fmt(s.figures.get(key), digits) for s in scenarios] for key, label, digits in FIGURES]
    return _table(["figure"] + [s.label for s in scenarios], rows)


def _replay_table(report: Report) -> str | None:
    rep = report.capacity.replay if report.capacity is not None else None
    if rep is None or not rep.policies:
        return None
    pol = rep.policies
    names = [p for p in ("recorded", "perfect", "full") if p in pol]

    def q(d: Distribution | None, which: str) -> float | None:
        return None if d is None else float(getattr(d, which))

    keys: list[tuple[str, Callable[[ReplayResult], float | None]]] = [
        ("queue wait p50 (s)", lambda r: q(r.queue_wait, "p50")),
        ("queue wait p95 (s)", lambda r: q(r.queue_wait, "p95")),
        ("queue wait mean (s)", lambda r: q(r.queue_wait, "mean")),
        ("TTFT p50 (s)", lambda r: q(r.ttft, "p50")),
        ("generated tokens", lambda r: r.generated_tokens),
        ("wasted tokens", lambda r: r.wasted_tokens),
        ("slot-seconds", lambda r: r.slot_seconds),
        ("goodput (tok/s)", lambda r: r.goodput)]
    rows = [[k] + [_fmt(f(pol[n])) for n in names] for k, f in keys]
    t = rep.step_timing
    saved = rep.queue_wait_saved_s or {}
    note = (f"Replay of this run's ledger in virtual time, step {_fmt((t.base_s if t else 0.0) * 1e3, 2)} ms "
            f"({t.source if t else ''}). recorded: aborts where the server really aborted; perfect: every Stop "
            f"aborted at once; full: nobody's stream stopped. Queue wait saved by perfect aborts vs none: "
            f"p50 {_fmt(saved.get('p50'))} s, p95 {_fmt(saved.get('p95'))} s, mean {_fmt(saved.get('mean'))} s.")
    return _table(["figure", *(f"replay: {n}" for n in names)], rows) + f'<p class="note">{html.escape(note)}</p>'


def render_html(scenarios: Sequence[Scenario], title: str = "stopstorm report") -> str:
    """The page for one run, or for several scenarios side by side (a comparison)."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts.append('<p class="note">' + "<br>".join(
        html.escape(f"{label}: host {r.meta.host or '?'}, {_fmt(r.meta.duration_s, 1)} s, "
                    f"truth: {', '.join(r.accounting.sources)}")
        for label, r in _runs(scenarios)) + "</p>")
    missed = [(label, r.accounting.run.ran_on) for label, r in _runs(scenarios) if r.accounting.run.ran_on.known]
    if missed:  # the missed closes in words (metrics/analysis/closes.py)
        parts.append('<p class="note">' + "<br>".join(html.escape(f"{label}: ran on (missed closes): {f.value} "
                                                                 f"[{f.source}]") for label, f in missed) + "</p>")
    parts += ["<h2>Summary</h2>", _summary_table(scenarios)]
    sections = [("Running and waiting over time", _timeline_plot(scenarios)),
                ("Queue wait", _cdf_plot(scenarios)),
                ("Abort latency", _abort_latency_plot(scenarios))]
    gpu = [p for label, r in _runs(scenarios) if (p := _gpu_plot(label, r))]
    if gpu:
        sections.append(("GPU utilisation and power", "".join(gpu)))
    for label, r in _runs(scenarios):
        rt = _replay_table(r)
        if rt:
            sections.append((f"What early aborts bought: {label}", rt))
    for name, body in sections:
        if body:
            parts += [f"<h2>{html.escape(name)}</h2>", body]
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    return redact(page)  # no key, no password (metrics/redact.py)


def html_path_for(json_path: str | os.PathLike[str], taken: str | os.PathLike[str] | None = None) -> Path:
    """`<json stem>.html`, or `<json stem>.stopstorm.html` where that is `taken` (Locust's own `--html` file)."""
    path = Path(json_path).with_suffix(".html")
    if taken and path.resolve() == Path(taken).resolve():
        path = Path(json_path).with_suffix(".stopstorm.html")
    return path


def write_html_report(json_path: str | os.PathLike[str], report: Report,
                      taken: str | os.PathLike[str] | None = None) -> Path:
    """Write the page for `report` beside its JSON (same name, .html; never over `taken`), atomically."""
    target = html_path_for(json_path, taken)
    tmp = target.with_name(f".{target.name}.tmp")
    scenario = run_scenario(report, report.meta.scenario or Path(json_path).stem)
    tmp.write_text(render_html([scenario], title=f"stopstorm report: {Path(json_path).name}"), encoding="utf-8")
    os.replace(tmp, target)
    return target

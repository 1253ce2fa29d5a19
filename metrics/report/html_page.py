"""One self-contained HTML page per run (or per comparison), written next to the JSON report.

A person opens it with no tool and no network: plots are matplotlib (Agg) SVG inlined in the page, tables are
plain HTML, nothing is fetched. The first screen answers first, as the console does: the run's settings in
the title block, the verdict (metrics/analysis/verdict.py), the fixed summary block and the per stack × close
mode table (the console's own rows, console.py's `summary_rows` and `cell_row`). Then, where the report has
them:

- over time: running and waiting requests against `max_num_seqs` (the capacity section's ledger timeline,
  capacity.py's step changes marked), zombies held, and tokens generated against tokens delivered (the
  report's `over_time` table);
- wasted tokens per stack × close mode; the TTFT CDF (the clients') and the queue-wait CDF, one line per
  scenario; abort latency for every stack × close mode that stopped streams (p50 and p99 bars; a mode the
  server never aborted is drawn as such, not left out);
- the self-monitor's caveat where it flagged timings; capacity.py's steps and knee; GPU utilisation and power
  over time with every Stop marked (the optional `gpu` section);
- the replay's counterfactual beside what was measured, and, for several scenarios, the comparison with n and
  its noise (metrics/report/compare.py).

`render_html(scenarios)` is pure (a run is one scenario: `run_scenario(report)`); `write_html_report(json_path,
report)` writes `<json stem>.html` beside the JSON. A writer over Reports: it computes nothing they do not hold.
"""

from __future__ import annotations

import datetime as dt
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

from stopstorm.metrics.analysis.accounting import NOT_STOPPED, Cell
from stopstorm.metrics.analysis.replay import ReplayResult
from stopstorm.metrics.figures import Distribution
from stopstorm.metrics.redact import redact
from stopstorm.metrics.report.compare import FIGURES, Scenario, compare, noise_warning, run_scenario
from stopstorm.metrics.report.console import (
    CELL_COLUMNS,
    cell_row,
    ledger_abort_split,
    self_monitor_warnings,
    summary_rows,
)
from stopstorm.metrics.report.model import Report

__all__ = ["html_path_for", "render_html", "render_report", "write_html_report"]

_CSS = """
body { font-family: sans-serif; margin: 1.2em 1.5em; color: #222; max-width: 1150px; }
h1 { font-size: 1.45em; margin-bottom: .2em; }
h2 { font-size: 1.15em; margin-top: 1.4em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .4em 0; font-size: .86em; }
th, td { border: 1px solid #ccc; padding: 2px 7px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.text, th.text { text-align: left; }
th { background: #f0f0f0; } .note { color: #555; font-size: .84em; } figure { margin: .4em 0; }
.plot svg { max-width: 100%; height: auto; }
.settings { font-size: .84em; color: #333; margin: .2em 0 .6em 0; }
.settings span { display: inline-block; margin-right: 1.2em; }
.verdict { background: #eef5ff; border-left: 5px solid #1f77b4; padding: .5em .9em; margin: .6em 0; }
.verdict p { margin: .3em 0; }
.caveat { background: #fff6e0; border-left: 5px solid #e0a000; padding: .4em .9em; margin: .5em 0; font-size: .9em; }
tr.all td { font-weight: bold; } tr.notstopped td { color: #666; }
.columns { display: flex; gap: 1.2em; flex-wrap: wrap; align-items: flex-start; }
"""

_SETTINGS = (("num_users", "users"), ("spawn_rate", "spawn rate"), ("run_time", "run time"),
             ("arrival_rate", "arrival rate /s"), ("stop_probability", "stop probability"), ("stop_at", "stop at"),
             ("close_mix", "close mix"), ("hold_seconds", "hold s"), ("max_tokens", "max tokens"),
             ("think_time", "think time s"), ("endpoint", "endpoint"), ("model", "model"))


def _svg(fig: PlotFigure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.find("<svg"):]  # drop the XML prolog and doctype: the page is HTML


def _figure_html(svg: str, caption: str, ident: str) -> str:
    return (f'<figure class="plot" id="{ident}">{svg}<figcaption class="note">{html.escape(caption)}'
            "</figcaption></figure>")


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:,}" if isinstance(v, int) else f"{v:,.{digits}f}"


def _runs(scenarios: Sequence[Scenario]) -> list[tuple[str, Report]]:
    """The scenarios that are runs of their own (a replay policy has no timeline, cells or GPU)."""
    return [(s.label, s.report) for s in scenarios if s.report is not None]


def _e(text: object) -> str:
    return html.escape(str(text))


# --- plots ---------------------------------------------------------------------------------------------------


def _over_time_plot(scenarios: Sequence[Scenario]) -> str | None:
    """Per run: running/waiting against max_num_seqs, zombies held, generated vs delivered tokens/s."""
    runs = [(label, r) for label, r in _runs(scenarios)
            if (r.capacity is not None and r.capacity.timeline.rows) or (r.over_time is not None and r.over_time.rows)]
    if not runs:
        return None
    panels: list[tuple[str, Report, str]] = []
    for label, r in runs:
        if r.capacity is not None and r.capacity.timeline.rows:
            panels.append((label, r, "slots"))
        ot = r.over_time
        if ot is not None and ot.rows and any(v for v in ot.column("zombies") if v):
            panels.append((label, r, "zombies"))
        if ot is not None and ot.rows:
            panels.append((label, r, "tokens"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.3 * len(panels)), squeeze=False)
    for ax, (label, r, kind) in zip(axes[:, 0], panels, strict=True):
        if kind == "slots":
            cap = r.capacity
            assert cap is not None
            rows = cap.timeline.rows
            t = [row[0] for row in rows]
            running, waiting = [row[1] for row in rows], [row[2] for row in rows]
            many = len(rows) > 5000  # hours of traffic: draw the lines as an inline bitmap, not 10⁵ SVG vertices
            ax.fill_between(t, running, step="post", color="tab:blue", alpha=.18, lw=0, rasterized=many)
            ax.step(t, running, where="post", label="running", color="tab:blue", rasterized=many)
            ax.step(t, waiting, where="post", label="waiting", color="tab:orange", rasterized=many)
            top = max([*running, *waiting, 1])
            if cap.max_num_seqs:
                # Drawn above the running line, which sits on it whenever the slots are full
                ax.axhline(cap.max_num_seqs, color="black", ls=(0, (4, 3)), lw=1.4, zorder=5,
                           label=f"max_num_seqs = {cap.max_num_seqs}")
                top = max(top, cap.max_num_seqs)
            ax.set_ylim(0, top * 1.25 + 0.5)
            search = r.capacity_search
            if search is not None:
                for k, step in enumerate(search.steps):
                    if step.end_s is not None:
                        ax.axvline(step.end_s, color="grey", lw=.8, ls=":", zorder=1)
                        ax.text(step.end_s, top * 1.2 + 0.4, f"{step.users} u{' ✓' if step.held else ' ✗'}",
                                fontsize=7, ha="right", va="top", color="dimgrey")
                    elif k == 0:
                        break
            ax.set_ylabel("requests")
            ax.set_title(f"{label}: running and waiting" if len(runs) > 1 else "running and waiting requests",
                         fontsize=9, loc="left")
        elif kind == "zombies":
            ot = r.over_time
            assert ot is not None
            ax.step(ot.column("t_s"), [v or 0 for v in ot.column("zombies")], where="post", color="tab:brown",
                    label="zombies held (most at once in the bin)")
            ax.set_ylabel("zombies")
            ax.set_ylim(0, max(v or 0 for v in ot.column("zombies")) * 1.3 + 0.5)
            ax.set_title(f"{label}: zombies" if len(runs) > 1 else "zombies: stopped streams still generating",
                         fontsize=9, loc="left")
        else:
            ot = r.over_time
            assert ot is not None
            t = ot.column("t_s")
            gen = ot.column("generated_tok_s")
            if any(v is not None for v in gen):
                ax.step(t, [v or 0 for v in gen], where="post", color="tab:gray", label="generated (throughput)")
            ax.step(t, ot.column("delivered_tok_s"), where="post", color="tab:cyan", label="delivered (goodput)")
            ax.set_ylabel("tokens/s")
            ax.set_ylim(bottom=0)
            ax.set_title(f"{label}: tokens" if len(runs) > 1 else "goodput against throughput", fontsize=9,
                         loc="left")
        ax.grid(alpha=.25)
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, borderaxespad=0)
    axes[-1, 0].set_xlabel("seconds since run start")
    fig.tight_layout()
    return _figure_html(_svg(fig), "Over time. Running and waiting: the simulator ledger at every change (dotted: "
                        "capacity.py's steps, ✓ held the SLO, ✗ broke it). Zombies: stopped streams whose slot "
                        "was still busy after the zombie grace. Tokens: the ledger's generated tokens against the "
                        "tokens users read before their Stop, per bin.", "over-time")


def _cdf(series: Sequence[tuple[str, Sequence[float]]], xlabel: str, caption: str, ident: str) -> str | None:
    series = [(n, s) for n, s in series if s]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 3.0))
    for name, samples in series:
        xs = sorted(samples)
        ys = [(k + 1) / len(xs) for k in range(len(xs))]
        ax.step([x * 1e3 for x in xs], ys, where="post", label=f"{name} (n={len(xs)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return _figure_html(_svg(fig), caption, ident)


def _cdf_plots(scenarios: Sequence[Scenario]) -> str | None:
    runs = _runs(scenarios)
    qw = _cdf([(label, r.capacity.queue_wait_samples_s) for label, r in runs if r.capacity is not None],
              "queue wait (ms)", "Queue wait CDF: arrival to admission into a running slot (simulator ledger).",
              "queue-wait-cdf")
    ttft = _cdf([(label, r.summary.ttft_samples_s) for label, r in runs if r.summary is not None],
                "TTFT (ms)", "TTFT CDF: send to first token, as the clients saw it (client records).", "ttft-cdf")
    parts = [p for p in (ttft, qw) if p]
    return f'<div class="columns">{"".join(parts)}</div>' if parts else None


def _stopped_cells(r: Report) -> list[Cell]:
    """The cells whose users pressed Stop (or, in an older report without counts, whose aborts were timed)."""
    return [c for c in r.accounting.cells if c.close_mode != NOT_STOPPED
            and ((isinstance(c.figures.stopped.value, int) and c.figures.stopped.value > 0)
                 or c.figures.abort_latency.known)]


def _abort_latency_plot(scenarios: Sequence[Scenario]) -> str | None:
    """p50/p99 bars for every stack × close mode that stopped streams; one the server never aborted is a
    hatched bar across the axis saying so (its streams ran on), not a gap."""
    bars: list[tuple[str, float | None, float | None, str]] = []
    runs = _runs(scenarios)
    for label, r in runs:
        prefix = f"{label}: " if len(runs) > 1 else ""
        for cell in _stopped_cells(r):
            f = cell.figures
            lat = f.abort_latency.value
            name = f"{prefix}{cell.stack} × {cell.close_mode}"
            if isinstance(lat, Distribution):
                bars.append((name, lat.p50 * 1e3, lat.p99 * 1e3, f"{f.aborted.value}/{f.stopped.value} aborted"))
            else:
                z = f.zombies.value
                why = (f"never aborted: {z} of {f.stopped.value} ran on as zombies" if isinstance(z, int) and z
                       else "never aborted" if f.aborted.value == 0 else "no server truth")
                bars.append((name, None, None, why))
    if not bars:
        return None
    known = [b for b in bars if b[1] is not None]
    lo = min((b[1] for b in known if b[1]), default=1.0) or 1.0
    hi = max((b[2] for b in known if b[2] is not None), default=100.0) or 100.0
    fig, ax = plt.subplots(figsize=(10, 0.36 * len(bars) + 1.2))
    log = lo > 0 and hi / lo > 20  # a step and a held socket differ by 100×: only then a log scale
    edge = hi * (3 if log else 1.15)
    for y, (_name, p50, p99, words) in enumerate(bars):
        if p50 is None or p99 is None:
            ax.barh(y, edge - (lo / 2 if log else 0), left=lo / 2 if log else 0, height=0.7, color="#eeeeee",
                    hatch="///", edgecolor="#999999", lw=0)
            ax.text(lo if log else edge * 0.01, y, f"  {words}", va="center", fontsize=8, color="#444444")
            continue
        ax.barh(y - 0.2, p50, height=0.4, color="tab:blue", label="p50" if y == _known_first(bars) else None)
        ax.barh(y + 0.2, p99, height=0.4, color="tab:red", label="p99" if y == _known_first(bars) else None)
        ax.text(p99, y + 0.2, f" {p99:,.1f} ms ({words})", va="center", fontsize=7, color="#444444")
    ax.set_yticks(list(range(len(bars))), [b[0] for b in bars], fontsize=8)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
        ax.set_xlim(lo / 2, edge)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("Stop → slot freed (ms, log scale)")
    else:
        ax.set_xlim(0, edge)
        ax.set_xlabel("Stop → slot freed (ms)")
    ax.grid(axis="x", alpha=.3)
    if known:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _figure_html(_svg(fig), "Abort latency per client stack × close mode that stopped streams (server "
                        "truth); hatched: the server never aborted them.", "abort-latency")


def _known_first(bars: Sequence[tuple[str, float | None, float | None, str]]) -> int:
    return next((k for k, b in enumerate(bars) if b[1] is not None), -1)


def _wasted_plot(scenarios: Sequence[Scenario]) -> str | None:
    bars: list[tuple[str, float]] = []
    runs = _runs(scenarios)
    for label, r in runs:
        prefix = f"{label}: " if len(runs) > 1 else ""
        for c in r.accounting.cells:
            w = c.figures.wasted_tokens.value
            if isinstance(w, int | float):
                bars.append((f"{prefix}{c.stack} × {c.close_mode}", float(w)))
    if not bars or not any(w for _n, w in bars):
        return None
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(bars) + 1.0))
    ax.barh(range(len(bars)), [w for _n, w in bars], color="tab:brown", height=0.6)
    for y, (_n, w) in enumerate(bars):
        ax.text(w, y, f" {w:,.0f}", va="center", fontsize=7)
    ax.set_yticks(list(range(len(bars))), [n for n, _w in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("wasted tokens (generated − read)")
    ax.grid(axis="x", alpha=.3)
    fig.tight_layout()
    return _figure_html(_svg(fig), "Wasted tokens per client stack × close mode: generated for a stream beyond what "
                        "its user read (simulator ledger).", "wasted-tokens")


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
    return _figure_html(_svg(fig), "GPU utilisation and power over time; red lines: users' Stops.", "gpu")


# --- tables --------------------------------------------------------------------------------------------------


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], ident: str = "",
           row_class: Callable[[Sequence[str]], str] | None = None, text_cols: int = 1) -> str:
    def cls(i: int) -> str:
        return ' class="text"' if 0 < i < text_cols else ""

    h = "".join(f"<th{cls(i)}>{_e(c)}</th>" for i, c in enumerate(head))
    body = "".join(
        (f'<tr class="{row_class(r)}">' if row_class is not None and row_class(r) else "<tr>")
        + "".join(f"<td{cls(i)}>{_e(c)}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    idattr = f' id="{ident}"' if ident else ""
    return f"<table{idattr}><tr>{h}</tr>{body}</table>"


def _settings(r: Report) -> str:
    m = r.meta
    opts = m.options
    when = (dt.datetime.fromtimestamp(m.started_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            if m.started_at else "?")
    seqs = r.capacity.max_num_seqs if r.capacity is not None else None
    items = [("host", m.host or "?"), ("started", when), ("duration", f"{_fmt(m.duration_s, 1)} s")]
    items += [(name, str(opts[k])) for k, name in _SETTINGS if opts.get(k) not in (None, "", 0, False)]
    if seqs:
        items.append(("max_num_seqs", str(seqs)))
    if m.scenario:
        items.append(("scenario", m.scenario))
    items.append(("truth", ", ".join(r.accounting.sources)))
    if m.partial:
        items.append(("PARTIAL", m.partial_reason or "cut short"))
    return "".join(f"<span><b>{_e(k)}</b> {_e(v)}</span>" for k, v in items)


def _verdict_html(r: Report) -> str:
    v = r.verdict
    if v is None:
        return ""
    body = "".join(f"<p>{_e(s)}</p>" for s in v.sentences)
    caveats = "".join(f"<p>{_e(c)}</p>" for c in v.caveats)
    return (f'<div class="verdict" id="verdict">{body}</div>'
            + (f'<div class="caveat" id="caveats">{caveats}</div>' if caveats else ""))


def _summary_html(r: Report) -> str:
    if r.summary is None:
        return ""
    rows = [[label, text, source] for label, text, source in summary_rows(r.summary, r.accounting)]
    return _table(["figure", "value", "source"], rows, "summary", text_cols=3)


def _cells_html(r: Report) -> str:
    a = r.accounting
    rows = [list(cell_row(c.stack, c.close_mode, c.figures)) for c in a.cells]
    rows.append(list(cell_row("all", "all", a.overall)))

    def cls(row: Sequence[str]) -> str:
        return "all" if row[0] == "all" else "notstopped" if row[1] == NOT_STOPPED else ""

    notes = [f"truth: {', '.join(a.sources)}. aborted: stopped streams the server aborted. zombie: a stopped stream "
             f"still holding its slot {a.zombie_grace_s:g} s after Stop. not stopped: streams nobody stopped "
             "(whatever close mode they would have used)."]
    split = ledger_abort_split(a)
    run = a.run
    if split:
        notes.append(split + ".")
    if run.ran_on.known:  # the missed closes in words (metrics/analysis/closes.py)
        notes.append(f"ran on (missed closes): {run.ran_on.value} [{run.ran_on.source}].")
    if run.blind_spot.known:
        notes.append(f"vLLM blind spot: {run.blind_spot.value} [{run.blind_spot.source} vs "
                     f"{run.vllm_counted_aborts.source}].")
    cut = a.overall.interrupted.value
    if isinstance(cut, int) and cut:
        notes.append(f"cut by the run's end: {cut} streams (recorded, not failures).")
    failures = a.overall.failures.value
    if isinstance(failures, dict) and failures:
        worst = sorted(failures.items(), key=lambda kv: -kv[1])
        notes.append("failed: " + "; ".join(f"{n}× {text}" for text, n in worst))
    return (_table(list(CELL_COLUMNS), rows, "cells", cls, text_cols=2)
            + "".join(f'<p class="note">{_e(n)}</p>' for n in notes))


def _monitor_html(r: Report) -> str | None:
    lines = self_monitor_warnings(r.self_monitor)
    if not r.self_monitor:
        return None
    rows = []
    for key, s in r.self_monitor.items():
        hub = s.hub_lag
        rows.append([key, _fmt(s.cpu_pct, 0), "–" if hub is None else f"{hub.max_ms:,.1f}",
                     "–" if hub is None else f"{hub.lagged:,}", f"{s.ttft_flagged:,} / {s.ttft_checked:,}",
                     f"{s.itl_flagged:,} / {s.itl_checked:,}", f"{s.gc_pause_max_ms:,.1f}"])
    table = _table(["process", "CPU % of a core", "hub lag max ms", "stalls", "TTFT flagged", "ITL flagged",
                    "GC pause max ms"], rows, "self-monitor")
    caveat = "".join(f'<p class="note">{_e(x)}</p>' for x in lines)
    return table + caveat


def _capacity_html(r: Report) -> str | None:
    s = r.capacity_search
    if s is None:
        return None
    rows = []
    for st in s.steps:
        iv = f"{st.interval_s[0]:,.3f} to {st.interval_s[1]:,.3f}" if st.interval_s else "–"
        rows.append([f"{st.users}", f"{st.requests:,}" + (" (few)" if st.requests < s.min_requests else ""),
                     _fmt(st.value_s), iv, "held" if st.held else "BROKEN", _fmt(st.request_rate, 2),
                     _fmt(st.output_rate, 1), "knee" if st.users == s.knee_users else ""])
    table = _table(["users", "requests", f"{s.slo.split('<')[0]} (s)", "95 % interval (s)", "SLO", "req/s",
                    "output tok/s", ""], rows, "capacity-steps")
    note = (f"{s.estimate} A step judged on fewer than {s.min_requests} requests (few) rests on under 5 requests "
            f"beyond its quantile. req/s and tok/s: {s.steps[0].rate_source if s.steps else ''}.")
    return table + f'<p class="note">{_e(note)}</p>'


def _replay_table(report: Report) -> str | None:
    rep = report.capacity.replay if report.capacity is not None else None
    if rep is None or not rep.policies:
        return None
    pol = rep.policies
    names = [p for p in ("recorded", "perfect", "full") if p in pol]
    heads = {"recorded": "replay model: as run", "perfect": "replay: every Stop aborted at once",
             "full": "replay: every stopped stream run to its end"}
    o, cap = report.accounting.overall, report.capacity

    def q(d: Distribution | None, which: str) -> float | None:
        return None if d is None else float(getattr(d, which))

    qw = o.queue_wait.value if isinstance(o.queue_wait.value, Distribution) else None
    ttft = cap.ttft.value if cap is not None and isinstance(cap.ttft.value, Distribution) else None
    keys: list[tuple[str, Callable[[ReplayResult], float | None], float | None]] = [
        ("queue wait p50 (s)", lambda r: q(r.queue_wait, "p50"), q(qw, "p50")),
        ("queue wait p95 (s)", lambda r: q(r.queue_wait, "p95"), q(qw, "p95")),
        ("queue wait mean (s)", lambda r: q(r.queue_wait, "mean"), q(qw, "mean")),
        ("server TTFT p50 (s)", lambda r: q(r.ttft, "p50"), q(ttft, "p50")),
        ("generated tokens", lambda r: r.generated_tokens,
         cap.generated_tokens.value if cap is not None and isinstance(cap.generated_tokens.value, int) else None),
        ("wasted tokens", lambda r: r.wasted_tokens,
         o.wasted_tokens.value if isinstance(o.wasted_tokens.value, int) else None),
        ("slot-seconds", lambda r: r.slot_seconds, None),
        ("goodput (tok/s)", lambda r: r.goodput,
         float(o.goodput_rate.value) if isinstance(o.goodput_rate.value, int | float) else None)]
    rows = [[k, _fmt(measured), *(_fmt(f(pol[n])) for n in names)] for k, f, measured in keys]
    t = rep.step_timing
    saved = rep.queue_wait_saved_s or {}
    note = (f"The measured column is this run (simulator ledger, client records); the replay columns are a model of "
            f"it: this run's ledger replayed in virtual time, step {_fmt((t.base_s if t else 0.0) * 1e3, 2)} ms "
            f"({t.source if t else ''}), its goodput over the replay's own makespan. The model's 'as run' column "
            f"beside the measured one shows its error. Queue wait saved by aborting every Stop at once instead of "
            f"none: p50 {_fmt(saved.get('p50'))} s, p95 {_fmt(saved.get('p95'))} s, mean {_fmt(saved.get('mean'))} s.")
    return (_table(["figure", "measured (this run)", *(heads[n] for n in names)], rows, "replay")
            + f'<p class="note">{_e(note)}</p>')


def _compare_html(scenarios: Sequence[Scenario]) -> str:
    base = scenarios[0]
    rows = []
    for key, label, digits in FIGURES:
        cells = [label]
        for s in scenarios:
            x = s.figures.get(key)
            n = s.counts.get(key)
            cells.append("–" if x is None else f"{x:,.{digits}f}" + (f" (n {n:,})" if n is not None else ""))
        rows.append(cells)
    said = [c.words(d) for s in scenarios[1:] if s.report is not None  # runs only: a replay is in the table
            for key, _l, d in FIGURES if (c := compare(base, s, key)) is not None]
    items = "".join(f"<li>{_e(w)}</li>" for w in said)
    warning = noise_warning(scenarios)
    head = ["figure", f"{base.label} (baseline)", *(s.label for s in scenarios[1:])]
    return ((f'<div class="caveat">{_e(warning)}</div>' if warning else "") + _table(head, rows, "compare")
            + (f"<p>Against {_e(base.label)}:</p><ul class=\"note\">{items}</ul>" if items else "")
            + '<p class="note">n: the requests behind a figure. Intervals: a 95 % bootstrap over the reports\' '
              "per-request samples (queue wait; it takes requests as independent, and neighbours in one queue are "
              "not, so it is the least noise to expect: repeats are the firmer test); a difference whose interval "
              "spans 0, or whose repeats overlap, is within noise.</p>")


def render_html(scenarios: Sequence[Scenario], title: str = "stopstorm report", data: str | None = None) -> str:
    """The page for one run, or for several scenarios side by side (a comparison); `data` names the JSON beside
    it, linked so that whoever reads the page can get every figure as data."""
    runs = _runs(scenarios)
    parts = [f"<h1>{_e(title)}</h1>"]
    if data:
        parts.append(f'<p class="note">Data: <a href="{_e(data)}">{_e(data)}</a> (this report as JSON)</p>')
    for label, r in runs:
        prefix = f"<b>{_e(label)}</b>: " if len(runs) > 1 else ""
        parts.append(f'<div class="settings">{prefix}{_settings(r)}</div>')
    if len(runs) == 1:
        r = runs[0][1]
        parts += [_verdict_html(r), _summary_html(r)]
        parts += ["<h2>Per client stack × close mode</h2>", _cells_html(r)]
    if len(scenarios) > 1:
        parts += ["<h2>Scenarios compared</h2>", _compare_html(scenarios)]
    sections = [("Over time", _over_time_plot(scenarios)),
                ("Abort latency", _abort_latency_plot(scenarios)),
                ("Wasted tokens", _wasted_plot(scenarios)),
                ("TTFT and queue wait", _cdf_plots(scenarios))]
    gpu = [p for label, r in runs if (p := _gpu_plot(label, r))]
    if gpu:
        sections.append(("GPU utilisation and power", "".join(gpu)))
    for label, r in runs:
        cap = _capacity_html(r)
        if cap:
            sections.append((f"Capacity steps: {label}" if len(runs) > 1 else "Capacity steps", cap))
        rt = _replay_table(r)
        if rt:
            sections.append((f"What early aborts bought: {label}", rt))
        mon = _monitor_html(r)
        if mon:
            sections.append((f"Load generator health: {label}" if len(runs) > 1 else "Load generator health", mon))
    if len(runs) > 1:
        for label, r in runs:
            sections.append((f"Verdict: {label}", _verdict_html(r) + _cells_html(r)))
    for name, body in sections:
        if body:
            parts += [f"<h2>{_e(name)}</h2>", body]
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    return redact(page)  # no key, no password (metrics/redact.py)


def _title(report: Report, name: str) -> str:
    m = report.meta
    when = dt.datetime.fromtimestamp(m.started_at, dt.UTC).strftime("%Y-%m-%d %H:%M") if m.started_at else ""
    label = m.scenario or name
    return f"stopstorm report: {label}" + (f", {when} UTC" if when else "")


def render_report(report: Report, name: str = "run", data: str | None = None) -> str:
    """The page of one run (what `write_html_report` writes, and the web UI serves); `data`: its JSON's name."""
    return render_html([run_scenario(report, report.meta.scenario or name)], title=_title(report, name), data=data)


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
    tmp.write_text(render_report(report, Path(json_path).stem, Path(json_path).name), encoding="utf-8")
    os.replace(tmp, target)
    return target

"""One self-contained HTML page per run (or per comparison), written next to the JSON report.

A person opens it with no tool and no network: plots are matplotlib (Agg) SVG inlined in the page, tables are
plain HTML, nothing is fetched. What it shows, where the report has it:

- running and waiting requests over time (the `capacity` section's ledger timeline);
- the queue-wait CDF, one line per scenario (several reports on one page when comparing);
- abort latency per client stack × close mode (p50 and p99 bars, log scale: a step and a held socket differ
  by 100×);
- GPU utilisation and power over time with every Stop marked (the optional `gpu` section);
- the replay's counterfactual (queue wait saved by early aborts) and the accounting figures as tables.

`render_html(docs)` is pure; `write_html_report(json_path, doc)` writes `<json stem>.html` beside the JSON.
"""

from __future__ import annotations

import html
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
from matplotlib.figure import Figure

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


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.find("<svg"):]  # drop the XML prolog and doctype: the page is HTML


def _figure_html(svg: str, caption: str) -> str:
    return f'<figure class="plot">{svg}<figcaption class="note">{html.escape(caption)}</figcaption></figure>'


def _label(doc: Mapping[str, Any], i: int) -> str:
    return str(doc.get("_label") or (doc.get("meta") or {}).get("scenario") or f"run {i + 1}")


def _value(fig: Mapping[str, Any] | None, key: str | None = None) -> float | None:
    if not fig:
        return None
    v = fig.get("value")
    if key is not None:
        v = v.get(key) if isinstance(v, dict) else None
    return float(v) if isinstance(v, int | float) else None


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:,}" if isinstance(v, int) else f"{v:,.{digits}f}"


# --- plots ---------------------------------------------------------------------------------------------------


def _timeline_plot(docs: Sequence[Mapping[str, Any]]) -> str | None:
    runs = [(i, d) for i, d in enumerate(docs) if ((d.get("capacity") or {}).get("timeline") or {}).get("rows")]
    if not runs:
        return None
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.6 * len(runs)), squeeze=False)
    for ax, (i, d) in zip(axes[:, 0], runs, strict=True):
        cap = d["capacity"]
        rows = cap["timeline"]["rows"]
        t = [r[0] for r in rows]
        many = len(rows) > 5000  # hours of traffic: draw the lines as an inline bitmap, not 10⁵ SVG vertices
        ax.step(t, [r[1] for r in rows], where="post", label="running", color="tab:blue", rasterized=many)
        ax.step(t, [r[2] for r in rows], where="post", label="waiting", color="tab:orange", rasterized=many)
        if cap.get("max_num_seqs"):
            ax.axhline(cap["max_num_seqs"], color="grey", ls=":", lw=1, label="max_num_seqs")
        ax.set_title(_label(d, i), fontsize=10, loc="left")
        ax.set_ylabel("requests")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since run start")
    fig.tight_layout()
    return _figure_html(_svg(fig), "Running and waiting requests over time (server truth: the simulator ledger).")


def _cdf_plot(docs: Sequence[Mapping[str, Any]]) -> str | None:
    series = [(_label(d, i), (d.get("capacity") or {}).get("queue_wait_samples_s") or []) for i, d in enumerate(docs)]
    series = [(n, s) for n, s in series if s]
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


def _abort_latency_plot(docs: Sequence[Mapping[str, Any]]) -> str | None:
    bars: list[tuple[str, float, float]] = []
    for i, d in enumerate(docs):
        prefix = f"{_label(d, i)}: " if len(docs) > 1 else ""
        for cell in d.get("cells") or []:
            lat = (cell.get("figures") or {}).get("abort_latency")
            p50, p99 = _value(lat, "p50"), _value(lat, "p99")
            if p50 is not None and p99 is not None:
                bars.append((f"{prefix}{cell['stack']} × {cell['close_mode']}", p50 * 1e3, p99 * 1e3))
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


def _gpu_plot(doc: Mapping[str, Any], i: int) -> str | None:
    gpu = doc.get("gpu") or {}
    tl = gpu.get("timeline") or {}
    cols, rows = tl.get("columns") or [], tl.get("rows") or []
    if not rows or "t_s" not in cols:
        return None
    ix = {c: k for k, c in enumerate(cols)}
    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax2 = ax.twinx()
    for g in sorted({r[ix["gpu"]] for r in rows} if "gpu" in ix else {0}):
        mine = [r for r in rows if "gpu" not in ix or r[ix["gpu"]] == g]
        t = [r[ix["t_s"]] for r in mine]
        if "util_pct" in ix:
            ax.plot(t, [r[ix["util_pct"]] for r in mine], color="tab:green", label=f"GPU {g} utilisation %")
        if "power_w" in ix:
            ax2.plot(t, [r[ix["power_w"]] for r in mine], color="tab:purple", label=f"GPU {g} power W")
    for k, s in enumerate(gpu.get("stop_marks_s") or []):
        ax.axvline(s, color="tab:red", lw=1.2, ls="--", label="Stop" if k == 0 else None)
    ax.set_xlabel("seconds since run start")
    ax.set_ylabel("utilisation %")
    ax.set_ylim(0, 105)
    ax2.set_ylabel("power (W)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    ax.set_title(_label(doc, i), fontsize=10, loc="left")
    fig.tight_layout()
    return _figure_html(_svg(fig), "GPU utilisation and power over time; red lines: users' Stops.")


# --- tables --------------------------------------------------------------------------------------------------


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _summary_table(docs: Sequence[Mapping[str, Any]]) -> str:
    from stopstorm.metrics.report.compare import (  # one place for the figures a comparison shows
        FIGURES,
        scenario_figures,
    )

    values = [scenario_figures(d) for d in docs]
    rows = [[label] + [_fmt(v.get(key), digits) for v in values] for key, label, digits in FIGURES]
    return _table(["figure"] + [_label(d, i) for i, d in enumerate(docs)], rows)


def _replay_table(doc: Mapping[str, Any]) -> str | None:
    rep = (doc.get("capacity") or {}).get("replay") or {}
    pol = rep.get("policies") or {}
    if not pol:
        return None
    names = [p for p in ("recorded", "perfect", "full") if p in pol]
    keys = [("queue wait p50 (s)", lambda r: (r.get("queue_wait") or {}).get("p50")),
            ("queue wait p95 (s)", lambda r: (r.get("queue_wait") or {}).get("p95")),
            ("queue wait mean (s)", lambda r: (r.get("queue_wait") or {}).get("mean")),
            ("TTFT p50 (s)", lambda r: (r.get("ttft") or {}).get("p50")),
            ("generated tokens", lambda r: r.get("generated_tokens")),
            ("wasted tokens", lambda r: r.get("wasted_tokens")),
            ("slot-seconds", lambda r: r.get("slot_seconds")),
            ("goodput (tok/s)", lambda r: r.get("goodput_tok_s"))]
    rows = [[k] + [_fmt(f(pol[n])) for n in names] for k, f in keys]
    t = rep.get("step_timing") or {}
    saved = rep.get("queue_wait_saved_s") or {}
    note = (f"Replay of this run's ledger in virtual time, step {_fmt((t.get('base_s') or 0) * 1e3, 2)} ms "
            f"({t.get('source', '')}). recorded: aborts where the server really aborted; perfect: every Stop "
            f"aborted at once; full: nobody's stream stopped. Queue wait saved by perfect aborts vs none: "
            f"p50 {_fmt(saved.get('p50'))} s, p95 {_fmt(saved.get('p95'))} s, mean {_fmt(saved.get('mean'))} s.")
    return _table(["figure", *names], rows) + f'<p class="note">{html.escape(note)}</p>'


def render_html(docs: Sequence[Mapping[str, Any]], title: str = "stopstorm report") -> str:
    """The page for one report, or for several side by side (a comparison)."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    metas = [d.get("meta") or {} for d in docs]
    parts.append('<p class="note">' + "<br>".join(
        html.escape(f"{_label(d, i)}: host {m.get('host', '?')}, {_fmt(m.get('duration_s'), 1)} s, "
                    f"truth: {', '.join(d.get('sources') or [])}")
        for i, (d, m) in enumerate(zip(docs, metas, strict=True))) + "</p>")
    parts += ["<h2>Summary</h2>", _summary_table(docs)]
    sections = [("Running and waiting over time", _timeline_plot(docs)),
                ("Queue wait", _cdf_plot(docs)),
                ("Abort latency", _abort_latency_plot(docs))]
    gpu = [p for i, d in enumerate(docs) if (p := _gpu_plot(d, i))]
    if gpu:
        sections.append(("GPU utilisation and power", "".join(gpu)))
    for i, d in enumerate(docs):
        rt = _replay_table(d)
        if rt:
            sections.append((f"What early aborts bought: {_label(d, i)}", rt))
    for name, body in sections:
        if body:
            parts += [f"<h2>{html.escape(name)}</h2>", body]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def html_path_for(json_path: str | os.PathLike[str], taken: str | os.PathLike[str] | None = None) -> Path:
    """`<json stem>.html`, or `<json stem>.stopstorm.html` where that is `taken` (Locust's own `--html` file)."""
    path = Path(json_path).with_suffix(".html")
    if taken and path.resolve() == Path(taken).resolve():
        path = Path(json_path).with_suffix(".stopstorm.html")
    return path


def write_html_report(json_path: str | os.PathLike[str], doc: Mapping[str, Any],
                      taken: str | os.PathLike[str] | None = None) -> Path:
    """Write the page for `doc` beside its JSON (same name, .html; never over `taken`), atomically."""
    target = html_path_for(json_path, taken)
    tmp = target.with_name(f".{target.name}.tmp")
    labelled = {"_label": (doc.get("meta") or {}).get("scenario") or Path(json_path).stem, **doc}
    tmp.write_text(render_html([labelled], title=f"stopstorm report: {Path(json_path).name}"), encoding="utf-8")
    os.replace(tmp, target)
    return target

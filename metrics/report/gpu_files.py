"""The GPU part of the run report: the `gpu` section of the JSON, the timeline as CSV and as a plot beside the
report, and the console lines. Pure over a sampler's readings and the run's records, apart from the two files.

The plot is drawn with matplotlib's Agg backend (a dependency, for the HTML report too); where it cannot be
imported the timeline is still in the JSON and the CSV, and the console says so.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from stopstorm.metrics.analysis.accounting import Accounting
from stopstorm.metrics.analysis.gpu_attribution import (
    IDLE_PCT,
    TIMELINE_COLUMNS,
    GpuFigures,
    attribute,
    stop_marks,
    timeline_rows,
    waste_share,
)
from stopstorm.metrics.figures import Distribution, Figure
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.report.document import figure_json
from stopstorm.metrics.truth.gpu import GpuSource

__all__ = ["add_gpu_section", "side_paths", "source_name", "write_stops_csv", "write_timeline_csv",
           "write_timeline_plot"]

_log = logging.getLogger("stopstorm")


def source_name(sampler: GpuSource) -> str:
    return "DCGM exporter" if sampler.name == "dcgm" else "NVML"


def write_timeline_csv(path: Path, rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(TIMELINE_COLUMNS)
        w.writerows(rows)


def write_stops_csv(path: Path, records: list[StreamRecord], start: float, g: GpuFigures) -> None:
    """Every Stop of the run: when, whose, and Stop → GPU idle where that stop left the GPU idle."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("t_s", "stack", "close_mode", "request_id", "stop_to_idle_s"))
        for r in sorted((r for r in records if r.stop is not None), key=lambda r: r.stop or 0.0):
            x = g.stop_to_idle_by_request.get(r.request_id)
            w.writerow((round((r.stop or 0.0) - start, 4), r.stack, r.close_mode, r.request_id,
                        "" if x is None else round(x, 4)))


def write_timeline_plot(path: Path, rows: list[list[Any]], marks: list[float], title: str) -> bool:
    """Utilisation and power against time, one line per GPU, Stops as vertical ticks. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_u, ax_p) = plt.subplots(2, 1, sharex=True, figsize=(11, 6))
    for gpu in sorted({r[1] for r in rows}):
        mine = [r for r in rows if r[1] == gpu]
        ax_u.plot([r[0] for r in mine if r[2] is not None], [r[2] for r in mine if r[2] is not None],
                  label=f"GPU {gpu}", linewidth=1, drawstyle="steps-pre")
        ax_p.plot([r[0] for r in mine if r[3] is not None], [r[3] for r in mine if r[3] is not None],
                  label=f"GPU {gpu}", linewidth=1, drawstyle="steps-pre")
    for ax in (ax_u, ax_p):
        for m in marks:
            ax.axvline(m, color="tab:red", alpha=0.5, linewidth=0.8)
        ax.grid(alpha=0.3)
    ax_u.set_ylabel("utilisation %")
    ax_u.set_ylim(-2, 102)
    ax_p.set_ylabel("power W")
    ax_p.set_xlabel("seconds since the run's start (red: a user pressed Stop)")
    ax_u.legend(loc="upper right", fontsize="small")
    ax_u.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def side_path(report_path: str, tag: str) -> Path:
    """A file beside the report: `<report stem>-<tag>` (tag with its suffix, e.g. `gpu-stops.csv`)."""
    p = Path(report_path)
    stem = p.with_suffix("") if p.suffix else p
    return Path(f"{stem}-{tag}")


def side_paths(report_path: str, tag: str = "gpu-timeline") -> tuple[Path, Path]:
    """The timeline's CSV and plot beside the report: `<report stem>-gpu-timeline.csv` / `.png`."""
    return side_path(report_path, f"{tag}.csv"), side_path(report_path, f"{tag}.png")


def _summary_lines(g: GpuFigures, source: str, n_gpus: int) -> list[str]:
    def num(f: Figure, digits: int = 1) -> str:
        return f"{f.value:,.{digits}f}" if isinstance(f.value, int | float) else "–"

    lines = [f"GPU ({source}, {n_gpus} GPU{'s' if n_gpus != 1 else ''}):",
             f"  busy:                 {num(g.gpu_busy_seconds, 2)} GPU-s; energy {num(g.energy)} J "
             f"(mean {num(g.mean_power)} W)",
             f"  per delivered token:  {num(g.energy_per_delivered_token, 3)} J",
             f"  on wasted tokens:     {num(g.wasted_gpu_seconds, 2)} GPU-s, {num(g.wasted_energy)} J  "
             f"[{g.wasted_energy.source}; by share of generated tokens]"]
    d = g.stop_to_idle.value
    if isinstance(d, Distribution):
        lines.append(f"  Stop → GPU idle:      p50 {d.p50 * 1e3:,.0f} ms, max {d.max * 1e3:,.0f} ms "
                     f"over {num(g.idle_stops, 0)} stops that left it idle")
    else:
        lines.append(f"  Stop → GPU idle:      – ({g.stop_to_idle.note})")
    for stack, mode, n, dist in g.cells:
        v = dist.value
        if isinstance(v, Distribution):
            lines.append(f"    {stack:<13} {mode:<6} p50 {v.p50 * 1e3:,.0f} ms, max {v.max * 1e3:,.0f} ms "
                         f"({num(n, 0)} stops)")
    return lines


def _cells(g: GpuFigures, accounting: Accounting, delivered: float | None,
           wasted: float | None) -> list[dict[str, Any]]:
    """Per stack × close mode: the GPU time and energy its wasted tokens are charged, and its Stop → idle."""
    idle = {(stack, mode): (n, d) for stack, mode, n, d in g.cells}
    out = []
    for c in accounting.cells:
        cw = c.figures.wasted_tokens.value
        w_busy, w_energy = waste_share(g, cw if isinstance(cw, int | float) else None, delivered, wasted)
        n, d = idle.get((c.stack, c.close_mode), (None, None))
        if n is None or d is None:  # no stop of this cell left the GPU idle (or no utilisation at all)
            known = g.idle_stops.known
            n = Figure(0 if known else None, "stops", g.idle_stops.source, g.idle_stops.note)
            d = Figure(None, "s", "unavailable", "no stop of this cell left the GPU idle" if known else
                       g.stop_to_idle.note)
        out.append({"stack": c.stack, "close_mode": c.close_mode, "wasted_gpu_seconds": figure_json(w_busy),
                    "wasted_energy": figure_json(w_energy), "idle_stops": figure_json(n),
                    "stop_to_idle": figure_json(d)})
    return out


def add_gpu_section(doc: dict[str, Any], sampler: GpuSource, accounting: Accounting, records: list[StreamRecord],
                    start: float, end: float, report_path: str, idle: float = IDLE_PCT) -> list[str]:
    """Add the `gpu` section to the report document (schema in metrics/report/document.py), write the timeline CSV
    and plot beside the report, and return the console lines. Never raises: a failure is one line."""
    try:
        source = source_name(sampler)
        o = accounting.overall
        delivered = o.goodput_tokens.value if isinstance(o.goodput_tokens.value, int | float) else None
        wasted = o.wasted_tokens.value if isinstance(o.wasted_tokens.value, int | float) else None
        g = attribute(sampler.samples, sampler.util_samples, start, end, records, delivered, wasted, source,
                      o.wasted_tokens.source, idle_pct=idle, delivered_source=o.goodput_tokens.source)
        rows = timeline_rows(sampler.samples, start)
        marks = [round(m, 4) for m in stop_marks(records, start)]
        csv_path, png_path = side_paths(report_path)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        write_timeline_csv(csv_path, rows)
        stops_path = side_path(report_path, "gpu-stops.csv")
        write_stops_csv(stops_path, records, start, g)
        plotted = write_timeline_plot(png_path, rows, marks, f"stopstorm GPU timeline ({source})")
        section: dict[str, Any] = {
            "source": sampler.name,
            "devices": [d.to_json() for d in sampler.devices],
            "interval_s": sampler.interval,
            "idle_pct": idle,
            "errors": sampler.errors,
            "last_error": sampler.last_error,
            "timeline": {"columns": list(TIMELINE_COLUMNS), "rows": rows},
            "util_samples": {"columns": ["t_s", "gpu", "util_pct"],
                             "rows": [[round(u.t - start, 4), u.gpu, u.util_pct] for u in sampler.util_samples]},
            "stop_marks_s": marks,
            "files": {"timeline_csv": str(csv_path), "stops_csv": str(stops_path),
                      "plot_png": str(png_path) if plotted else None},
        }
        for name, f in g.items():
            section[name] = figure_json(f)
        section["cells"] = _cells(g, accounting, delivered, wasted)
        doc["gpu"] = section
        lines = _summary_lines(g, source, len(sampler.devices))
        lines.append(f"  timeline: {csv_path}, stops: {stops_path}" + (f", plot: {png_path}" if plotted else
                                                   " (no plot: matplotlib cannot be imported)"))
        return lines
    except Exception as exc:
        _log.exception("stopstorm: the GPU figures failed; the rest of the report stands")
        return [f"GPU: figures failed ({type(exc).__name__}: {exc})"]



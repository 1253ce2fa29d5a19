"""The GPU's files beside the report: the timeline as CSV and as a plot, and every Stop as CSV, written from
the Report's `gpu` section (names: `<report stem>-gpu-timeline.csv/.png`, `<report stem>-gpu-stops.csv`).

The plot is drawn with matplotlib's Agg backend (a dependency, for the HTML report too); where it cannot be
imported the timeline is still in the JSON and the CSV, and the report says so.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stopstorm.metrics.analysis.gpu_attribution import GpuSection
from stopstorm.metrics.figures import Table

__all__ = ["can_plot", "gpu_file_names", "side_path", "write_gpu_files", "write_table_csv", "write_timeline_plot"]


def side_path(report_path: str, tag: str) -> Path:
    """A file beside the report: `<report stem>-<tag>` (tag with its suffix, e.g. `gpu-stops.csv`)."""
    p = Path(report_path)
    stem = p.with_suffix("") if p.suffix else p
    return Path(f"{stem}-{tag}")


def can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def gpu_file_names(report_path: str, tag: str = "gpu-timeline") -> dict[str, str | None]:
    """Where the GPU's files go beside the report (the plot None where matplotlib cannot be imported)."""
    return {"timeline_csv": str(side_path(report_path, f"{tag}.csv")),
            "stops_csv": str(side_path(report_path, "gpu-stops.csv")),
            "plot_png": str(side_path(report_path, f"{tag}.png")) if can_plot() else None}


def write_table_csv(path: Path, table: Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(table.columns)
        w.writerows(table.rows)  # None is written as an empty field


def write_timeline_plot(path: Path, rows: Sequence[Sequence[Any]], marks: Sequence[float], title: str) -> bool:
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


def write_gpu_files(g: GpuSection, title: str | None = None) -> None:
    """The files the section names: timeline CSV, stops CSV, and the plot where matplotlib can draw it."""
    files = g.files
    if files.get("timeline_csv"):
        write_table_csv(Path(str(files["timeline_csv"])), g.timeline)
    if files.get("stops_csv"):
        write_table_csv(Path(str(files["stops_csv"])), g.stops)
    if files.get("plot_png"):
        source = "DCGM exporter" if g.source == "dcgm" else "NVML"
        write_timeline_plot(Path(str(files["plot_png"])), g.timeline.rows, g.stop_marks_s,
                            title or f"stopstorm GPU timeline ({source})")

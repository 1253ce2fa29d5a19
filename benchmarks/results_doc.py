"""The shape of a benchmark's results as data: what `--json PATH` writes and what benchmarks/results/*.json hold.

    {"benchmark": "bench_simulator", "script": "benchmarks/bench_simulator.py",
     "provenance": {"measured": "YYYY-MM-DD", "commit": "<40 hex>", "source": "...", "command": "...",
                    "machine": "..."},
     "tables": {ID: {"title": "...", "provenance": {...overrides...}, "notes": "...",
                     "columns": [COLUMN, ...], "rows": [{KEY: VALUE, ...}, ...]}},
     "figures": [{"id", "label", "value", "unit", "note"?, "provenance"?: {...}}],
     ...}                                  # beside these, whatever the script wrote before (its raw numbers)

COLUMN is {"label", "key"} or {"label", "keys": [...], "sep": " / "}, with an optional "format" (a Python format
string, applied to each number; default "{}") and "align" ("right" or "left"). A row may carry "_format":
{KEY: FORMAT} for a row whose unit differs. A value that is null prints as "–"; a string prints as it is.
A table's or figure's "provenance" overrides the file's for that item alone. benchmarks/render_tables.py turns
the tables into the Markdown of docs/benchmarks/; a run's file can be merged into benchmarks/results/ with
`python benchmarks/render_tables.py --take RUN.json`.

`document()` builds a run's file with its provenance filled in (today, the checkout's commit, this machine).
Standard library only.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["document", "dumps", "provenance", "table"]

ROOT = Path(__file__).resolve().parent.parent


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{out} (with uncommitted changes)" if dirty else out


def provenance(argv: list[str] | None = None) -> dict[str, str]:
    """Where a run's numbers come from: today (UTC), the commit, the command line, the machine."""
    argv = sys.argv if argv is None else argv
    script = os.path.relpath(os.path.abspath(argv[0]), ROOT) if argv else "?"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "measured": datetime.datetime.now(datetime.UTC).date().isoformat(),
        "commit": _commit(),
        "source": f"written by {script} --json",
        "command": shlex.join(["python", script, *argv[1:]]),
        "machine": f"{os.cpu_count()} CPUs ({platform.machine()}), {platform.system()} {platform.release()}, "
                   f"Python {platform.python_version()}, load average {load:.2f} at the end",
    }


def table(columns: list[dict[str, Any]], rows: list[dict[str, Any]], title: str | None = None) -> dict[str, Any]:
    """One table of a results file (its provenance is the file's unless it gets its own)."""
    out: dict[str, Any] = {"columns": columns, "rows": rows}
    if title:
        out = {"title": title, **out}
    return out


def document(benchmark: str, tables: dict[str, dict[str, Any]], figures: list[dict[str, Any]] | None = None, *,
             command: str | None = None, source: str | None = None, **raw: Any) -> dict[str, Any]:
    """A run's results file: the tables (and figures) with this run's provenance, then the script's raw data.
    `command` and `source` replace what sys.argv would say (for a locustfile run through Locust)."""
    prov = provenance()
    if command is not None:
        prov["command"] = command
    if source is not None:
        prov["source"] = source
    doc: dict[str, Any] = {"benchmark": benchmark, "script": f"benchmarks/{benchmark}.py", "provenance": prov,
                           "tables": tables}
    if figures:
        doc["figures"] = figures
    for key, value in raw.items():
        if key in doc:
            raise ValueError(f"raw key {key!r} would hide the results' own")
        doc[key] = value
    return doc


def dumps(doc: Any, indent: int = 0) -> str:
    """JSON a person can diff: objects that hold objects open up, one line per row, column or figure."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(doc, dict) and any(isinstance(v, dict | list) and v and not _flat_list(v) for v in doc.values()):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in doc.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(doc, list) and doc and all(isinstance(v, dict) for v in doc):
        return "[\n" + ",\n".join(f"{inner}{json.dumps(v, ensure_ascii=False, default=str)}" for v in doc) \
            + f"\n{pad}]"
    return json.dumps(doc, ensure_ascii=False, default=str)


def _flat_list(v: Any) -> bool:
    return isinstance(v, list) and not any(isinstance(x, dict | list) for x in v)

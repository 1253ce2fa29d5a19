"""Where a run's memory goes per finished stream: tracemalloc snapshots taken during a real run, compared.

    locust -f benchmarks/trace_memory.py --headless -u 60 -r 60 -t 100s --think-time 0 --max-tokens 100 \\
        --sim-args "--max-num-seqs 60 --step-base-ms 20" [--trace-after 30] [--trace-window 60] [--trace-top 10] \\
        [--trace-json out.json]

This is locustfile.py (every stack, every hook) with tracemalloc started before anything else is imported.
`--trace-after` seconds into the run it takes a snapshot (after a full GC), `--trace-window` seconds later a
second one, and when the run stops prints what grew in between per stream collected in that window, by
allocation site (the frame that allocated, and the nearest stopstorm frame that led there), biggest first.
bench_soak.py measures the RSS; this says which objects make it. The sizes are what Python allocated: the
allocator's own overhead and fragmentation are not in them. tracemalloc slows the run several times over:
read shares, not speeds. Bounded like any run (`-t`); with no `--host` the embedded simulator is the target;
one process only (no --master/--worker).
"""

# ruff: noqa: E402, F403  (tracemalloc must start before the modules it should see are imported)

from __future__ import annotations

import tracemalloc

tracemalloc.start(16)

import gc
import sys
from pathlib import Path
from typing import Any

import gevent
from locust import events
from locust.runners import LocalRunner

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stopstorm.locustfile import *
from stopstorm.metrics.plugin.state import RUN

_PROJECT = str(ROOT)


@events.init_command_line_parser.add_listener
def _options(parser: Any, **_kw: Any) -> None:
    g = parser.add_argument_group("trace_memory", "tracemalloc snapshots during the run")
    g.add_argument("--trace-after", type=float, default=30.0, help="seconds into the run of the first snapshot")
    g.add_argument("--trace-window", type=float, default=60.0, help="seconds between the two snapshots")
    g.add_argument("--trace-top", type=int, default=10, help="allocation sites to print")
    g.add_argument("--trace-json", default="", help="also write the result here (benchmarks/results/ shape; "
                   "Locust owns --json)")


def _snapshot() -> tuple[tracemalloc.Snapshot, int]:
    gc.collect()
    return tracemalloc.take_snapshot(), len(RUN.records)


def _site(tb: tracemalloc.Traceback) -> str:
    """The allocating frame, and the innermost stopstorm frame that led to it (when it is another)."""
    inner = tb[-1]  # frames run oldest to most recent
    ours = next((f for f in reversed(list(tb)) if f.filename.startswith(_PROJECT)), None)
    where = f"{_short(inner.filename)}:{inner.lineno}"
    if ours is not None and ours is not inner:
        where += f"  (from {_short(ours.filename)}:{ours.lineno})"
    return where


def _short(filename: str) -> str:
    """A path from the project's root, or from site-packages, or the standard library's module path."""
    if filename.startswith(_PROJECT):
        return str(Path(filename).relative_to(ROOT))
    for marker in ("site-packages/", "/lib/python3."):
        if marker in filename:
            tail = filename.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker.startswith("/lib") else tail
    return filename


def report(first: tuple[tracemalloc.Snapshot, int], second: tuple[tracemalloc.Snapshot, int], top: int,
           json_path: str = "") -> None:
    (a, n_a), (b, n_b) = first, second
    streams = n_b - n_a
    # Not the first snapshot itself (tracemalloc's own module allocated it).
    mine = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = b.filter_traces(mine).compare_to(a.filter_traces(mine), "traceback")
    total = sum(s.size_diff for s in stats)
    per = max(streams, 1)
    print(f"trace_memory: {streams} streams collected between the snapshots; Python's allocations grew "
          f"{total / 1024:.0f} KiB, {total / per:.0f} B per stream", flush=True)
    for s in stats[:top]:
        print(f"  {s.size_diff / per:7.0f} B/stream  {s.count_diff:+7d} blocks  {_site(s.traceback)}")
    if json_path:
        from results_doc import document, dumps  # beside this file
        from results_doc import table as results_table

        columns = [{"label": "B per stream", "key": "bytes_per_stream", "format": "{:,.0f}", "align": "right"},
                   {"label": "blocks", "key": "blocks", "format": "{:+,}", "align": "right"},
                   {"label": "allocation site", "key": "site"}]
        rows = [{"bytes_per_stream": st.size_diff / per, "blocks": st.count_diff, "site": _site(st.traceback)}
                for st in stats[:top]]
        figures = [{"id": "streams_between_snapshots", "label": "streams collected between the snapshots",
                    "value": streams},
                   {"id": "growth_per_stream", "label": "Python's allocations grew, per stream",
                    "value": round(total / per / 1000, 2), "unit": "KB"}]
        doc = document("trace_memory", {"sites": results_table(columns, rows, "What grew between the two "
                                                               "snapshots per stream, by allocation site")},
                       figures, command=" ".join(["locust", *sys.argv[1:]]),
                       source="written by benchmarks/trace_memory.py --trace-json")
        Path(json_path).write_text(dumps(doc) + "\n")


_snapshots: list[tuple[tracemalloc.Snapshot, int]] = []


@events.test_start.add_listener
def _start(environment: Any, **_kw: Any) -> None:
    opts = environment.parsed_options

    def trace() -> None:
        gevent.sleep(opts.trace_after)
        _snapshots.append(_snapshot())
        gevent.sleep(opts.trace_window)
        _snapshots.append(_snapshot())

    if isinstance(environment.runner, LocalRunner):  # one process: its records are all here
        gevent.spawn(trace)


@events.test_stop.add_listener
def _stop(environment: Any, **_kw: Any) -> None:
    """Compared after the users stop: the comparison holds the loop for seconds, which would stall streams."""
    if len(_snapshots) == 2:
        report(*_snapshots, environment.parsed_options.trace_top, environment.parsed_options.trace_json)
    else:
        print(f"trace_memory: the run ended before the second snapshot ({len(_snapshots)} taken): make -t longer "
              "than --trace-after + --trace-window", flush=True)

"""What the end-of-run report costs as a run grows: its build time and the memory it takes at that moment.

    python benchmarks/bench_report_scale.py [--users 64] [--duration-s 40] [--scales 1,10,40] [--json out.json]

During a run stopstorm keeps neither its records nor the simulator's ledger in memory (both wait on disk:
metrics/plugin/record_sink.py, metrics/plugin/ledger_drain.py), but the report still reads one run's worth
back, once, and joins it. This measures that moment. It records one real run (a headless `locust -f
locustfile.py` of every stack against a simulator it starts, `--stopstorm-records` kept, the ledger read whole
afterwards), then copies it end to end `k` times (each copy's marks shifted by the run's span and its ids made
unique, so the ledger's occupancy stays what the server really had) and, per scale, writes the records to a
record store on disk, reads them back and builds the Report from them as the plugin does (`build_report`, the
counterfactual replay included). Per scale: streams, the read-back and build times, and the peak of Python's
allocations during read-back + build (tracemalloc; the process's RSS adds the allocator's overhead), as bytes
per stream.

Loopback only; the simulator and locust are stopped by PID; the run is bounded by `--duration-s` (+ 60 s).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stopstorm.metrics.plugin.record_sink import RecordStore  # noqa: E402
from stopstorm.metrics.record import StreamRecord  # noqa: E402
from stopstorm.metrics.report.build import RunInputs, build_report  # noqa: E402
from stopstorm.metrics.report.model import RunMeta  # noqa: E402
from stopstorm.metrics.truth.ledger import LedgerSnapshot  # noqa: E402
from stopstorm.simulator.launcher import EmbeddedSimulator  # noqa: E402
from stopstorm.simulator.ledger import LedgerEntry  # noqa: E402

_ENTRY_MARKS = ("arrival", "scheduled", "first_token", "last_token", "connection_lost", "disconnect_seen", "freed",
                "first_sent")


def record_run(users: int, duration_s: int, out: Path) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    """One real run's records (as written) and the simulator's whole ledger after it, and its max_num_seqs."""
    sim = EmbeddedSimulator(["--max-num-seqs", str(users), "--step-base-ms", "10"],
                            log_path=str(out / "simulator.log"))
    url = sim.start()
    jsonl = out / "records.jsonl"
    cmd = [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "--host", url, "-u", str(users),
           "-r", str(users), "-t", f"{duration_s}s", "--think-time", "0", "--max-tokens", "100",
           "--stopstorm-records", str(jsonl), "--stopstorm-report", str(out / "report.json"), "--only-summary"]
    try:
        with (out / "locust.log").open("w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
                                    stderr=subprocess.STDOUT)
            try:
                proc.wait(duration_s + 60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        with httpx.Client(timeout=30) as client:
            ledger = client.get(f"{url}/stopstorm/ledger").json()
    finally:
        sim.stop()
    records = [json.loads(line) for line in jsonl.read_bytes().splitlines()]
    return records, ledger, users


def _shift_entry(doc: dict[str, Any], shift: float, suffix: str) -> LedgerEntry:
    entry = LedgerEntry.from_json(doc)
    entry.request_id += suffix
    for name in _ENTRY_MARKS:
        value = getattr(entry, name)
        if value is not None:
            setattr(entry, name, value + shift)
    if entry.send_times is not None:
        entry.send_times = [[t + shift, n] for t, n in entry.send_times]
    return entry


def copies(records: list[dict[str, Any]], ledger: dict[str, Any], k: int) -> tuple[
        list[dict[str, Any]], LedgerSnapshot, float, float]:
    """The run copied end to end `k` times: records (wire dicts), the ledger, and the window it spans."""
    starts = [r["sent"] for r in records]
    ends = [m for e in ledger["requests"] for m in (e.get("freed"), e.get("last_token")) if m is not None]
    start, end = min(starts), max([*ends, *(r["sent"] for r in records)])
    span = end - start + 1.0
    out_records: list[dict[str, Any]] = []
    entries: list[LedgerEntry] = []
    for c in range(k):
        suffix, shift = f"-x{c}", c * span
        for r in records:
            rec = StreamRecord.from_wire(r, shift=shift)
            rec.request_id += suffix
            if rec.server_id:
                rec.server_id += suffix
            out_records.append(rec.to_wire())
        entries.extend(_shift_entry(e, shift, suffix) for e in ledger["requests"])
    now = ledger["now"] + (k - 1) * span
    return out_records, LedgerSnapshot(now, tuple(entries), ledger.get("schema_version"),
                                       ledger.get("epoch_offset")), start, start + k * span


def measure(wire: list[dict[str, Any]], ledger: LedgerSnapshot, start: float, end: float, max_num_seqs: int,
            folder: Path) -> dict[str, Any]:
    """Write the records to a store on disk, then read them back and build the Report, as the plugin does."""
    store = RecordStore(folder / "store.jsonl")
    for w in wire:
        store.append(StreamRecord.from_wire(w))
    store.close()
    del wire
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    records = list(store)
    t1 = time.perf_counter()
    report = build_report(RunInputs(records=records, meta=RunMeta(host="http://127.0.0.1"), started=start, ended=end,
                                    ledger=ledger, max_num_seqs=max_num_seqs))
    t2 = time.perf_counter()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    streams = len(records)
    assert report.accounting.run.unjoined_streams.value == 0, "the copies did not join their ledger entries"
    store.discard()
    return {"streams": streams, "ledger_entries": len(ledger.entries), "read_s": round(t1 - t0, 3),
            "build_s": round(t2 - t1, 3), "peak_mb": round(peak / 2**20, 1),
            "kb_per_stream": round(peak / streams / 1000, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--duration-s", type=int, default=40)
    p.add_argument("--scales", default="1,10,40", help="copies of the recorded run, comma-separated")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    out = Path(tempfile.mkdtemp(prefix="stopstorm-report-scale-"))
    records, ledger, max_num_seqs = record_run(args.users, args.duration_s, out)
    print(f"recorded: {len(records)} streams, {len(ledger['requests'])} ledger entries; files in {out}", flush=True)
    rows = []
    print(f"{'copies':>6} {'streams':>8} {'read s':>7} {'build s':>8} {'peak MB':>8} {'KB/stream':>9}", flush=True)
    for k in scales:
        wire, snapshot, start, end = copies(records, ledger, k)
        row = {"copies": k, **measure(wire, snapshot, start, end, max_num_seqs, out)}
        del wire, snapshot
        gc.collect()
        rows.append(row)
        print(f"{k:>6} {row['streams']:>8,} {row['read_s']:>7} {row['build_s']:>8} {row['peak_mb']:>8} "
              f"{row['kb_per_stream']:>9}", flush=True)
    if args.json:
        from results_doc import document, dumps  # beside this script
        from results_doc import table as results_table

        title = (f"one real run ({args.users} users of every stack, {args.duration_s} s, no think time) copied end "
                 "to end: the report read back from disk and built")
        shown = [{c["key"]: row[c["key"]] for c in RESULTS_COLUMNS} for row in rows]  # the raw rows go beside
        doc = document("bench_report_scale", {"scale": results_table(RESULTS_COLUMNS, shown, title)}, rows=rows)
        Path(args.json).write_text(dumps(doc) + "\n")


RESULTS_COLUMNS = [
    {"label": "copies", "key": "copies", "align": "right"},
    {"label": "streams", "key": "streams", "format": "{:,}", "align": "right"},
    {"label": "read back", "key": "read_s", "format": "{:g} s", "align": "right"},
    {"label": "build", "key": "build_s", "format": "{:g} s", "align": "right"},
    {"label": "peak (Python)", "key": "peak_mb", "format": "{:g} MB", "align": "right"},
    {"label": "per stream", "key": "kb_per_stream", "format": "{:g} KB", "align": "right"},
]

if __name__ == "__main__":
    main()

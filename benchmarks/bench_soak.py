"""Soak: a long headless run at a fixed number of concurrent streams, with the memory of both processes
(locust and the simulator) sampled over time, to show whether it stays steady.

    python benchmarks/bench_soak.py [--duration-s 600] [--users 200] [--sample-s 10] [--step-base-ms 100]
                                    [--processes N] [--out DIR] [--json soak.json]

It starts one simulator (`python -m stopstorm.simulator`, its own process, `--max-num-seqs` = users so every stream
runs at once) and one headless `locust -f locustfile.py` (every client stack, the default Stop mix, no think
time) with `--stopstorm-records` and `--stopstorm-report`; with `--processes N`, as a master and N forked workers
(Locust's `--processes`), each sampled (the largest worker is the `worker` row). The simulator runs with
`--forget-read-ledger`, as the embedded one does: what stopstorm has drained is dropped. Every `--sample-s`
it reads each process's RSS (VmRSS in /proc/PID/status) and how many streams have ended (lines in the records
JSONL). At the end: the
run's exit, its report, the simulator's ledger size, and per process the RSS after the first minute, at the
end, the growth in between in MB/min, and that growth per stream ended (bytes/stream): what every finished
stream leaves behind in memory. stopstorm writes every record to its record store on disk as it ends (read back
once for the final report), so locust should stay flat; the simulator keeps every request in its ledger (server
truth) only until stopstorm has read it, so both should stay flat. Per process the summary also gives the
growth from minute 10 to the end in percent (the soak's target: at most 10 % over an hour).

Loopback only; both processes are stopped by their PIDs; the run is bounded by `--duration-s` (+ 60 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stopstorm.simulator.launcher import EmbeddedSimulator  # noqa: E402


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    """The direct children of `pid` (Locust's forked workers under --processes)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def count_lines(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    except OSError:
        return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration-s", type=int, default=600)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--step-base-ms", type=float, default=100.0,
                   help="simulator step (default 100 ms: ~10 tokens/s a stream, a slow large model)")
    p.add_argument("--processes", type=int, default=0,
                   help="run Locust as a master and this many forked workers (default 0: one process)")
    p.add_argument("--out", default="", help="folder for the run's files (default: a temp folder)")
    p.add_argument("--json", default="", help="also write the samples and summary here")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="stopstorm-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    sim = EmbeddedSimulator(["--max-num-seqs", str(args.users), "--step-base-ms", str(args.step_base_ms),
                             "--forget-read-ledger"], log_path=str(out / "simulator.log"))
    url = sim.start()
    jsonl = out / "records.jsonl"
    cmd = [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "--host", url, "-u", str(args.users),
           "-r", str(max(1, args.users // 10)), "-t", f"{args.duration_s}s", "--think-time", "0",
           "--stopstorm-records", str(jsonl), "--stopstorm-report", str(out / "report.json"),
           "--csv", str(out / "run"), "--only-summary",
           *(["--processes", str(args.processes)] if args.processes else [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = (out / "locust.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    print(f"soak: {args.users} streams for {args.duration_s} s; files in {out}", flush=True)
    names = ["locust", "worker", "simulator"] if args.processes else ["locust", "simulator"]
    print(f"{'t (s)':>6} " + " ".join(f"{n + ' MB':>13}" for n in names) + f" {'streams':>8}", flush=True)
    try:
        while proc.poll() is None and time.monotonic() - started < args.duration_s + 60:
            s: dict[str, Any] = {"t": round(time.monotonic() - started, 1), "locust_rss_mb": rss_mb(proc.pid),
                                 "simulator_rss_mb": rss_mb(sim.pid), "streams": count_lines(jsonl)}
            if args.processes:
                workers = [m for c in children(proc.pid) if (m := rss_mb(c)) is not None]
                s["worker_rss_mb"] = max(workers) if workers else None
                s["workers"] = len(workers)
            samples.append(s)
            print(f"{s['t']:>6} " + " ".join(f"{s[n + '_rss_mb'] or 0:>13.1f}" for n in names)
                  + f" {s['streams']:>8}", flush=True)
            deadline = time.monotonic() + args.sample_s
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        with httpx.Client(timeout=30) as client:  # every request the simulator saw: settled or not, read or not
            counts = client.get(f"{url}/stopstorm/ledger/settled", params={"after": 0, "limit": 1}).json()
            ledger_size = counts["settled"] + counts["unsettled"]
            ledger_held = len(client.get(f"{url}/stopstorm/ledger").json()["requests"])
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        sim.stop()
    report = json.loads((out / "report.json").read_text())
    summary: dict[str, Any] = {"users": args.users, "duration_s": args.duration_s, "exit_code": code,
                               "processes": args.processes,
                               "streams": count_lines(jsonl), "ledger_requests": ledger_size,
                               "ledger_entries_held_at_end": ledger_held,
                               "report_partial": report["meta"].get("partial"),
                               "unmatched_requests": report["run"]["figures"]["unmatched_requests"]["value"]}
    # The run's own time: after -t the report reads the run's records back (one run's worth, once), a peak of
    # its own, given apart as `report_peak_mb`.
    warm = [s for s in samples if 60 <= s["t"] <= args.duration_s]
    if len(warm) >= 2:
        first, last = warm[0], warm[-1]
        minutes = (last["t"] - first["t"]) / 60
        streams = max(1, last["streams"] - first["streams"])
        after_10 = [s for s in warm if s["t"] >= 600]
        for name in names:
            a, b = first[f"{name}_rss_mb"], last[f"{name}_rss_mb"]
            if a is None or b is None:
                continue
            peak = max(s[f"{name}_rss_mb"] or 0 for s in warm)
            report_peak = max((s[f"{name}_rss_mb"] or 0 for s in samples if s["t"] > args.duration_s), default=None)
            summary[name] = {"rss_mb_at_1min": a, "rss_mb_at_end": b, "peak_mb": peak, "report_peak_mb": report_peak,
                             "growth_mb_per_min": (b - a) / minutes, "bytes_per_stream": (b - a) * 2**20 / streams}
            if len(after_10) >= 2 and after_10[0][f"{name}_rss_mb"]:
                at_10 = after_10[0][f"{name}_rss_mb"]
                summary[name]["rss_mb_at_10min"] = at_10
                summary[name]["growth_pct_from_10min"] = round(100 * (b - at_10) / at_10, 2)
    print(json.dumps(summary, indent=2), flush=True)
    if args.json:
        from results_doc import document, dumps  # beside this script
        from results_doc import table as results_table

        # KB = 1000 bytes, as the README's soak table had it.
        shown = {"locust": "locust master", "worker": "locust worker (the larger)"} if args.processes else {}
        rows = [{"process": shown.get(name, name), "rss_mb_at_1min": summary[name]["rss_mb_at_1min"],
                 "rss_mb_at_end": summary[name]["rss_mb_at_end"],
                 "growth_mb_per_min": round(summary[name]["growth_mb_per_min"], 2),
                 "kb_per_stream": round(summary[name]["bytes_per_stream"] / 1000, 2),
                 "growth_pct_from_10min": summary[name].get("growth_pct_from_10min")}
                for name in names if name in summary]
        title = (f"{args.duration_s / 60:g} minutes at {args.users} concurrent streams ({args.users} users of every "
                 "stack, no think time, the default Stop mix"
                 + (f", a master and {args.processes} workers" if args.processes else "")
                 + "): RSS from 1 min to the run's end")
        # Ids by the run's shape (`rss_60min_2workers`), so a run of another length or shape adds its own table
        # beside the others in benchmarks/results/bench_soak.json instead of replacing theirs.
        tag = f"{args.duration_s / 60:g}min" + (f"_{args.processes}workers" if args.processes else "")
        tag = tag.replace(".", "_")
        figures = [{"id": f"{k}_{tag}", "label": label, "value": summary[k], "format": "{:,}"} for k, label in (
            ("streams", f"streams in the {args.duration_s / 60:g}-minute soak"),
            ("ledger_requests", f"ledger requests in the {args.duration_s / 60:g}-minute soak"),
            ("unmatched_requests", f"unmatched_requests in the {args.duration_s / 60:g}-minute soak"))]
        doc = document("bench_soak", {f"rss_{tag}": results_table(RESULTS_COLUMNS, rows, title)}, figures,
                       summary=summary, samples=samples)
        Path(args.json).write_text(dumps(doc) + "\n")


# The results table's columns (benchmarks/results/bench_soak.json; rendered by benchmarks/render_tables.py).
RESULTS_COLUMNS = [
    {"label": "process", "key": "process"},
    {"label": "RSS at 1 min", "key": "rss_mb_at_1min", "format": "{:.0f} MB", "align": "right"},
    {"label": "RSS at the end", "key": "rss_mb_at_end", "format": "{:.0f} MB", "align": "right"},
    {"label": "growth", "key": "growth_mb_per_min", "format": "{:g} MB/min", "align": "right"},
    {"label": "per stream ended", "key": "kb_per_stream", "format": "{:g} KB", "align": "right"},
    {"label": "growth from 10 min", "key": "growth_pct_from_10min", "format": "{:+g} %", "align": "right"},
]


if __name__ == "__main__":
    main()

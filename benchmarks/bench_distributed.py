"""Ingest scaling in Locust's distributed mode: chunks/s from 1 to 2 worker processes, and the master's cost per
record.

    python benchmarks/bench_distributed.py [--workers 1 2] [--repeats 2] [--seconds 10] [--users 32]
                                           [--user-class OpenAIUser] [--json out.json]

End to end: one simulator (`EmbeddedSimulator`, its own process; `--max-num-seqs 64 --step-base-ms 1
--step-per-seq-ms 0`, fast enough that the clients are the bottleneck), then for each worker count, alternated
`--repeats` times (best and median reported: on a shared machine the best run is the one least disturbed),
`locust -f locustfile.py USER_CLASS --headless --processes N -u U -t S` against it: streams
read to the end (`--stop-probability 0 --ignore-eos --max-tokens 400 --think-time 0`). The default user class
is the openai SDK stack (~100 µs of client CPU per chunk), so one worker saturates its core well below what the
simulator serves and a second worker has something to add. Measured from server truth: chunks/s = Σ ledger
`sent_tokens` (one token a chunk) / the run's duration from its report; records/s = streams the master's report
holds (each shipped by a worker) / duration; Locust CPU µs/chunk = CPU time of the master and its forked
workers (reaped children's rusage) / chunks, which shows whether a second process adds overhead when the
machine has no spare core to give it. Exactness is checked on every run: reported streams + ledger
requests no stream reported (users killed mid-stream at the time limit) = ledger requests, and no worker
incomplete.

In process: the master's ingest cost, µs per record, for batches of `BATCH_RECORDS` records of a 400-chunk
stream through Locust's own msgpack message (serialise on the worker side, unserialise + `RecordCollector`
on the master's).

Loopback only; every process it starts is stopped by its PID; every run has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIM_ARGS = ["--max-num-seqs", "64", "--step-base-ms", "1", "--step-per-seq-ms", "0"]


def _ledger(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/stopstorm/ledger", timeout=30) as r:
        return json.loads(r.read())


def _reset(url: str) -> None:
    req = urllib.request.Request(f"{url}/stopstorm/ledger/reset", method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()


def _wait_idle(url: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = _ledger(url)
        if all(e.get("freed") is not None for e in doc["requests"]) or time.monotonic() > deadline:
            return doc
        time.sleep(0.1)


def run_one(url: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    _wait_idle(url)
    _reset(url)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "locustfile.py"), args.user_class, "--headless",
               "--processes", str(workers), "-u", str(args.users), "-r", str(args.users), "-t", f"{int(args.seconds)}s",
               "--host", url, "--stop-probability", "0", "--ignore-eos", "--max-tokens", "400",
               "--think-time", "0", "--only-summary", "--stopstorm-report", str(report)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=args.seconds + 120)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the master and its forked workers, reaped
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if proc.returncode != 0 or not report.exists():
            raise RuntimeError(f"locust --processes {workers} failed ({proc.returncode}): "
                               f"{err.decode(errors='replace')[-2000:]}")
        doc = json.loads(report.read_text())
    ledger = _wait_idle(url)["requests"]
    duration = doc["meta"]["duration_s"]
    streams = doc["overall"]["figures"]["streams"]["value"]
    unmatched = doc["run"]["figures"]["unmatched_requests"]["value"]
    dist = doc["meta"].get("distributed") or {}
    exact = streams + unmatched == len(ledger) and not dist.get("incomplete") and dist.get("records") == streams
    chunks = sum(e["sent_tokens"] for e in ledger)
    return {"workers": workers, "duration_s": duration, "chunks": chunks, "chunks_per_s": chunks / duration,
            "records": streams, "records_per_s": streams / duration, "exact": exact,
            "locust_cpu_s": cpu, "us_per_chunk": cpu / chunks * 1e6 if chunks else None}


def master_ingest(batches: int = 50) -> dict[str, float]:
    """µs per record for the master (unserialise + collect) and the worker (to_wire + serialise)."""
    import locust  # noqa: F401  (gevent patching first, as in a locustfile)
    from locust.rpc.protocol import Message

    from stopstorm.metrics.plugin.distributed import BATCH_RECORDS, RecordCollector
    from stopstorm.metrics.record import StreamRecord

    n = 400
    rec = StreamRecord(stack="openai", close_mode="none", endpoint="chat", request_id="x" * 32, stop_plan="never",
                       wall_start=time.time(), sent=1.0, headers=1.01, first_token=1.02,
                       chunk_times=[1.02 + i * 0.001 for i in range(n)], chunk_tokens=list(range(1, n + 1)),
                       ended=1.5, tokens=n, usage_tokens=n, prompt_tokens=12, finish_reason="length", done=True,
                       status=200)
    records = [rec] * BATCH_RECORDS
    t0 = time.process_time()
    wires = []
    for i in range(batches):
        payload = {"records": [r.to_wire() for r in records], "batch": i, "sent": (i + 1) * BATCH_RECORDS,
                   "final": False, "clock_offset": 0.0}
        wires.append(Message("stopstorm_records", payload, "w").serialize())
    t1 = time.process_time()
    got: list[StreamRecord] = []
    collector = RecordCollector(got.append)
    for w in wires:
        msg = Message.unserialize(w)
        collector.receive(msg.node_id, msg.data)
    t2 = time.process_time()
    total = batches * BATCH_RECORDS
    assert len(got) == total
    return {"worker_us_per_record": (t1 - t0) / total * 1e6, "master_us_per_record": (t2 - t1) / total * 1e6,
            "bytes_per_record": sum(len(w) for w in wires) / total, "chunks_per_record": n}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--user-class", default="OpenAIUser")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    from stopstorm.simulator.launcher import EmbeddedSimulator

    ingest = master_ingest()
    print(f"record shipping: worker {ingest['worker_us_per_record']:.1f} µs/record, master "
          f"{ingest['master_us_per_record']:.1f} µs/record ({ingest['bytes_per_record']:.0f} bytes; "
          f"{ingest['chunks_per_record']} chunks a record)", flush=True)
    results: list[dict[str, Any]] = []
    with EmbeddedSimulator(SIM_ARGS) as sim:
        assert sim.url is not None
        for rep in range(args.repeats):
            order = args.workers if rep % 2 == 0 else list(reversed(args.workers))
            for n in order:
                r = run_one(sim.url, n, args)
                results.append(r)
                print(f"  workers={n} chunks/s={r['chunks_per_s']:,.0f} records/s={r['records_per_s']:,.1f} "
                      f"cpu={r['locust_cpu_s']:.1f}s µs/chunk={r['us_per_chunk']:.1f} exact={r['exact']}", flush=True)
    print(f"\n{args.user_class}, {args.users} users, streams of 400 chunks, {args.seconds:g} s runs, "
          f"{args.repeats} each\n")
    print("| worker processes | chunks/s best (ledger) | chunks/s median | scaling (best) | records/s at the master "
          "(best) | Locust CPU µs/chunk (median) | exact |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    base = None
    for n in args.workers:
        rs = [r for r in results if r["workers"] == n]
        best = max(r["chunks_per_s"] for r in rs)
        med = statistics.median(r["chunks_per_s"] for r in rs)
        rps = max(r["records_per_s"] for r in rs)
        us = statistics.median(r["us_per_chunk"] for r in rs)
        base = base or best
        print(f"| {n} | {best:,.0f} | {med:,.0f} | {best / base:.2f}× | {rps:,.1f} | {us:.1f} | "
              f"{all(r['exact'] for r in rs)} |")
    if args.json:
        from results_doc import document, dumps  # beside this script
        from results_doc import table as results_table

        rows, base = [], None
        for n in args.workers:
            rs = [r for r in results if r["workers"] == n]
            best = max(r["chunks_per_s"] for r in rs)
            base = base or best
            rows.append({"workers": n, "best_chunks_per_s": best,
                         "median_chunks_per_s": statistics.median(r["chunks_per_s"] for r in rs),
                         "scaling": best / base, "best_records_per_s": max(r["records_per_s"] for r in rs),
                         "median_us_per_chunk": statistics.median(r["us_per_chunk"] for r in rs)})
        title = (f"locust --processes N (alternated, {args.repeats} runs each), {args.users} {args.user_class}s "
                 "streaming 400-chunk completions to the end against the simulator; chunks/s from the ledger")
        figures = [{"id": f"{side}_us_per_record", "unit": "µs", "value": round(ingest[f"{side}_us_per_record"], 1),
                    "label": f"shipping cost per record of a {ingest['chunks_per_record']}-chunk stream, {side}"}
                   for side in ("worker", "master")]
        ingest_table = results_table(RESULTS_COLUMNS, rows, title)
        ingest_table["notes"] = ("Every run exact: reported streams + unreported in-flight ones = ledger requests, no "
                                 "worker incomplete." if all(r["exact"] for r in results) else
                                 "Not every run was exact: see the runs' `exact` in the raw data.")
        doc = document("bench_distributed", {"ingest": ingest_table}, figures, ingest=ingest, runs=results)
        Path(args.json).write_text(dumps(doc) + "\n")


# The results table's columns (benchmarks/results/bench_distributed.json; rendered by benchmarks/render_tables.py).
RESULTS_COLUMNS = [
    {"label": "worker processes", "key": "workers", "align": "right"},
    {"label": "chunks/s, best (ledger)", "key": "best_chunks_per_s", "format": "{:,.0f}", "align": "right"},
    {"label": "chunks/s, median", "key": "median_chunks_per_s", "format": "{:,.0f}", "align": "right"},
    {"label": "scaling (best)", "key": "scaling", "format": "{:.2f}×", "align": "right"},
    {"label": "records/s at the master (best)", "key": "best_records_per_s", "format": "{:,.1f}", "align": "right"},
    {"label": "Locust CPU µs/chunk (median)", "key": "median_us_per_chunk", "format": "{:.0f}", "align": "right"},
]


if __name__ == "__main__":
    main()

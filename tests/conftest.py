"""Shared test tools for the simulator: its processes, its truth (ledger, /metrics) and raw-socket streams.

Simulator processes are pooled per command line for the whole session, so modules that ask for the same flags
share one process; tests that share one reset its ledger first (`SimPool.fresh`). Every bound on time is
computed from the flags a simulator was started with (`SimHandle.step_bound`), never hard-coded.
"""

from __future__ import annotations

# Locust patches the standard library for gevent when it is imported; a real run imports it before anything of
# ours, and so must the tests: ssl imported (by requests) before the patch recurses without end once patched.
# isort: off
import locust  # noqa: F401  (first, for its monkey-patching)
# isort: on

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stopstorm.simulator.config import SimulatorConfig, build_parser, config_from_args
from stopstorm.simulator.launcher import EmbeddedSimulator

ROOT = Path(__file__).resolve().parent.parent  # the repository
FIXTURES_DIR = ROOT / "tests" / "fixtures"  # real servers' output, each folder with a README.txt saying how

# Scheduling slack on top of a modelled step: event-loop wake-up and a ledger write, on a loaded 2-core box.
SCHED_TOL_S = 0.003
# How soon after the client's close the server must notice it (uvicorn wakes on FIN/RST).
DISCONNECT_TOL_S = 0.005
# Every simulator in the tests runs 5 ms steps, so a token every ~5 ms.
FAST = ("--step-base-ms", "5")

Entry = dict[str, Any]  # a ledger entry as the simulator's HTTP API sends it (the wire, which tests check)


def ledger_by_id(doc: dict[str, Any]) -> dict[str, Entry]:
    """`GET /stopstorm/ledger`'s document as entries by request id."""
    return {e["request_id"]: e for e in doc.get("requests", [])}


# --- waiting without sleeping blind -------------------------------------------------------------------------


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.002, what: str = "") -> Any:
    """Poll `cond` until it returns something truthy; return that, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or cond}")
        time.sleep(interval)


def pid_gone(pid: int) -> bool:
    """True when the process has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


# --- /metrics -----------------------------------------------------------------------------------------------


class Scrape:
    """One /metrics scrape, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(self, sample_name: str) -> list[Any]:
        return [s for f in self.families.values() for s in f.samples if s.name == sample_name]

    def value(self, sample_name: str, **labels: str) -> float:
        """The one sample called `sample_name` whose labels include `labels`."""
        found = [s for s in self.samples(sample_name) if all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1, f"{sample_name}{labels}: expected one sample, found {found}"
        return found[0].value


# --- one simulator process ----------------------------------------------------------------------------------


class SimHandle:
    """A running simulator plus typed access to its ledger and /metrics."""

    def __init__(self, args: Sequence[str], log_path: str | None = None) -> None:
        self.args = tuple(args)
        # The simulator's own parser turns the flags into the config it runs with: bounds follow the flags.
        self.config: SimulatorConfig = config_from_args(build_parser().parse_args(list(args)))
        self.proc = EmbeddedSimulator(list(args), log_path=log_path)
        self.url = self.proc.start()
        self.log_path = self.proc.log_path
        self.http = httpx.Client(base_url=self.url, timeout=10.0)

    def close(self) -> None:
        self.http.close()
        self.proc.stop()

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        assert parts.hostname == "127.0.0.1" and parts.port is not None
        return parts.hostname, parts.port

    def step_bound(self, running: int = 1, prefill_tokens: int = 0) -> float:
        """Longest one engine step may take with these flags: the modelled duration plus scheduling slack."""
        return self.config.step_duration(running, prefill_tokens) + SCHED_TOL_S

    def max_step_lag(self) -> float:
        """The latest any of this simulator's steps has ended against its model so far, as the simulator measured
        it (/stopstorm/stats): a bound on a step's end that a starved host stretches says so by this much."""
        r = self.http.get("/stopstorm/stats")
        r.raise_for_status()
        return float(r.json()["engine"]["max_lag_s"])

    # ledger

    def ledger(self) -> dict[str, Any]:
        r = self.http.get("/stopstorm/ledger")
        r.raise_for_status()
        return r.json()

    def entries(self) -> dict[str, Entry]:
        return ledger_by_id(self.ledger())

    def entry(self, request_id: str) -> Entry | None:
        r = self.http.get(f"/stopstorm/ledger/{request_id}")
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.json()

    def wait_entry(self, request_id: str, until: Callable[[Entry], bool] = lambda e: e["freed"] is not None,
                   timeout: float = 10.0) -> Entry:
        """The ledger entry once `until` holds for it (default: it has left the engine)."""

        def check() -> Entry | None:
            e = self.entry(request_id)
            return e if e is not None and until(e) else None

        return wait_until(check, timeout, what=f"ledger entry {request_id}")

    def wait_idle(self, timeout: float = 15.0) -> dict[str, Entry]:
        """The ledger once every request in it has left the engine."""

        def check() -> tuple[dict[str, Entry]] | None:
            entries = self.entries()
            return (entries,) if all(e["freed"] is not None for e in entries.values()) else None

        return wait_until(check, timeout, interval=0.01, what="an idle simulator")[0]

    def reset(self) -> dict[str, Any]:
        r = self.http.post("/stopstorm/ledger/reset")
        r.raise_for_status()
        return r.json()

    def scrape(self) -> Scrape:
        r = self.http.get("/metrics")
        r.raise_for_status()
        return Scrape(r.text)

    def log_text(self) -> str:
        return Path(self.log_path).read_text(encoding="utf-8")


class SimPool:
    """Simulator processes keyed by their flags, shared for the whole session."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._sims: dict[tuple[str, ...], SimHandle] = {}

    def get(self, *args: str) -> SimHandle:
        key = tuple(args)
        sim = self._sims.get(key)
        if sim is None:
            log = self._log_dir / f"simulator-{len(self._sims)}.log"
            sim = self._sims[key] = SimHandle(key, log_path=str(log))
        return sim

    def fresh(self, *args: str) -> SimHandle:
        """A shared simulator, idle and with an empty ledger."""
        sim = self.get(*args)
        sim.wait_idle()
        sim.reset()
        assert sim.entries() == {}
        return sim

    def close(self) -> None:
        for sim in self._sims.values():
            sim.close()
        self._sims.clear()


@pytest.fixture(scope="session")
def sim_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimPool]:
    pool = SimPool(tmp_path_factory.mktemp("simlogs"))
    yield pool
    pool.close()


# --- requests -------------------------------------------------------------------------------------------------


def chat_body(max_tokens: int | None = 8, stream: bool = True, content: str = "Prove Bayes' theorem.",
              **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return body


def completion_body(max_tokens: int | None = 8, stream: bool = True, prompt: str = "Once upon a time",
                    **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return body


def parse_sse(payload: bytes | str) -> list[Any]:
    """Strict parse of the simulator's event stream: `data: <json>` events, each one line, then `[DONE]`.

    Returns the decoded JSON objects, with the string "[DONE]" for the end marker.
    """
    text = payload.decode() if isinstance(payload, bytes) else payload
    assert text.endswith("\n\n"), f"stream does not end with a blank line: {text[-80:]!r}"
    events: list[Any] = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, f"not a one-line data event: {block!r}"
        data = block[len("data: "):]
        events.append("[DONE]" if data == "[DONE]" else json.loads(data))
    return events


def content_tokens(events: list[Any]) -> int:
    """Content-bearing chunks in a per-token stream (the role chunk and usage chunk excluded)."""
    n = 0
    for ev in events:
        if not isinstance(ev, dict) or not ev.get("choices"):
            continue
        choice = ev["choices"][0]
        piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
        if piece:
            n += 1
    return n


class RawStream:
    """One HTTP/1.1 request over a bare loopback socket: exact control over reading, stalling and closing.

    The response body is de-chunked incrementally; SSE events are handed out as they complete.
    """

    def __init__(self, sim: SimHandle, path: str, body: dict[str, Any], request_id: str | None = None,
                 rcvbuf: int | None = None, headers: dict[str, str] | None = None, close: bool = True) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the advertised window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10.0)
        self.sock.connect(sim.host_port)
        data = json.dumps(body).encode()
        lines = [f"POST {path} HTTP/1.1", f"Host: {sim.host_port[0]}", "Content-Type: application/json",
                 f"Content-Length: {len(data)}"]
        if close:
            lines.append("Connection: close")
        if request_id is not None:
            lines.append(f"X-Request-Id: {request_id}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        self._raw = bytearray()
        self._body = bytearray()
        self._chunked = False
        self._ended = False
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.headers_at: float | None = None

    def _recv(self, timeout: float) -> bool:
        """One read into the raw buffer; False once the server has closed the connection."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return True
        if not data:
            self._ended = True
            return False
        self._raw += data
        return True

    def read_headers(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self._raw:
            assert time.monotonic() < deadline, "no response headers"
            assert self._recv(max(0.001, deadline - time.monotonic())), "connection closed before headers"
        self.headers_at = time.monotonic()
        end = self._raw.index(b"\r\n\r\n")
        head = bytes(self._raw[:end])
        del self._raw[: end + 4]
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for line in header_lines:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        return self.status

    def _dechunk(self) -> None:
        """Move whole chunks of the chunked transfer encoding from the raw buffer to the body."""
        if not self._chunked:
            self._body += self._raw
            self._raw.clear()
            return
        pos = 0
        raw = self._raw
        while True:
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(bytes(raw[pos:eol]).split(b";")[0], 16)
            if len(raw) < eol + 2 + size + 2:
                break
            self._body += raw[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2
            if size == 0:
                self._ended = True
                break
        del raw[:pos]

    def _fill(self, enough: Callable[[], bool], timeout: float) -> None:
        if self.status is None:
            self.read_headers(timeout)
        deadline = time.monotonic() + timeout
        while True:
            self._dechunk()
            if self._ended or enough():
                return
            assert time.monotonic() < deadline, f"response incomplete after {timeout} s"
            if not self._recv(max(0.001, deadline - time.monotonic())):
                self._dechunk()
                return

    def _take_events(self) -> list[Any]:
        cut = self._body.rfind(b"\n\n") + 2
        whole = bytes(self._body[:cut])
        del self._body[:cut]
        return parse_sse(whole) if whole else []

    def read_events(self, n: int, timeout: float = 10.0) -> list[Any]:
        """Block until at least `n` whole SSE events have arrived; return (and consume) all whole ones."""
        self._fill(lambda: self._body.count(b"\n\n") >= n, timeout)
        return self._take_events()

    def read_to_end(self, timeout: float = 20.0) -> list[Any]:
        """Every remaining event, up to the end of the response (a chunked body's last chunk, or the close)."""
        self._fill(lambda: False, timeout)
        assert self._ended, "response did not end"
        return self._take_events()

    def close(self) -> tuple[float, float]:
        """Close the socket; returns the monotonic times just before the close and just after it returned.

        A bound on when the server saw the close starts from the first and ends from the second: a test process
        preempted between its stamp and the close syscall (under CPU hogs) is then never charged to the server."""
        before = time.monotonic()
        self.sock.close()
        return before, time.monotonic()

    def __enter__(self) -> RawStream:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# --- simulator command lines shared by more than one module -----------------------------------------------------

# vLLM 0.9 flavour: error bodies, metric names and log lines of 0.9.x.
SIM_09 = (*FAST, "--vllm-flavour", "0.9", "--max-num-seqs", "4", "--output-len", "fixed:6")

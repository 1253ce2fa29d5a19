"""Follow the server's log where it is the output of a command (`kubectl logs -f`, `docker logs -f`,
`journalctl -fu`, `ssh host tail -F`) or arrives on standard input: the same line handling as a file
(metrics/truth/vllm_log.py's `LineFollower`: both log formats, the `-<8 hex>` suffix, each line stamped as
it is read), with a pipe for its source.

Why: where stopstorm matters most (Kubernetes, Docker, a GPU host of its own) vLLM's log is not a file on
the machine that runs stopstorm's master, so `--server-log PATH` cannot read it; a command can.

The command runs under `/bin/sh -c` in a session of its own, so its process group is its own: kubectl, ssh
and whatever else the shell starts are stopped together, by its PID (SIGTERM to the group, SIGKILL after
`timeout`). Its stdin is /dev/null, its stdout is the log and its stderr is kept apart (counted, the last
lines kept for the report), never parsed as log. Both pipes are read through the gevent hub: a greenlet waits
for the fd to be readable, reads at most `chunk` bytes and handles their lines, yielding to the other
greenlets every millisecond or so, so a chatty command never holds the hub for long
(tests/metrics/truth/test_log_command.py measures the lag it adds).
Each chunk's lines are stamped with `time.monotonic()` when it was read, so the transport's own delay
(kubectl's, ssh's, tail's) is in the stamp, and in the log's abort latency.

What can go wrong is a problem, never an exception: the command cannot start, exits during the run, says
nothing for `silent_after` seconds or nothing at all; standard input ends. Each is one line, appended to
`problems` and handed to `on_problem` as it happens; the follower keeps what it has read.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
import gevent.subprocess
from gevent.event import Event
from gevent.socket import wait_read

from stopstorm.metrics.truth.vllm_log import LineFollower, LogEvent

__all__ = ["PipeLogFollower"]

_SHELL = "/bin/sh"
_HOLD_S = 0.001  # the longest the reader handles lines before it lets other greenlets run
_YIELD_S = 1e-6  # a sleep above 0: the greenlet comes back on the loop's next cycle


class PipeLogFollower(LineFollower):
    """Read a log line by line from a command's standard output (`command`) or from a file descriptor that is
    already open (`fd`; `PipeLogFollower.stdin()` for fd 0), and index the add/abort events it names.

    `stop()` first lingers while lines are still arriving: until none came for `quiet` seconds, at most
    `linger` seconds (the last aborts of a run are still in the transport when the run ends); then it stops the
    command's process group and the readers. A line longer than `max_line` bytes is dropped and counted in
    `overlong`. Everything else is `LineFollower`'s.
    """

    def __init__(self, command: str | None = None, *, fd: int | None = None,
                 on_event: Callable[[LogEvent], object] | None = None,
                 on_problem: Callable[[str], object] | None = None, linger: float = 1.0, quiet: float = 0.2,
                 silent_after: float = 10.0, chunk: int = 1 << 16, max_line: int = 1 << 20,
                 stderr_keep: int = 20) -> None:
        if (command is None) == (fd is None):
            raise ValueError("give a command or a file descriptor")
        if command is not None and not command.strip():
            raise ValueError("the command is empty")
        super().__init__(on_event, on_problem)
        self.command = command
        self.fd = fd
        self.source = "command" if command is not None else "stdin" if fd == 0 else "fd"
        self.linger = linger
        self.quiet = quiet
        self.silent_after = silent_after
        self.chunk = chunk
        self.max_line = max_line
        self.pid: int | None = None
        self.returncode: int | None = None
        self.exited_after: float | None = None  # seconds from start() to the command's exit
        self.ended_early = False  # the command exited (or stdin ended) before stop()
        self.bytes = 0
        self.overlong = 0
        self.stderr_lines = 0
        self.stderr_tail: deque[str] = deque(maxlen=stderr_keep)
        self._proc: Any = None  # gevent.subprocess.Popen
        self._out: int | None = None
        self._err: int | None = None
        self._readers: list[gevent.Greenlet] = []
        self._started: float | None = None
        self._last_read = 0.0
        self._stopping = False
        self._stopped = False
        self._silence_told = False
        self._out_done = Event()

    @classmethod
    def stdin(cls, **kwargs: Any) -> PipeLogFollower:
        """Follow standard input (`--server-log -`)."""
        return cls(fd=0, **kwargs)

    @property
    def what(self) -> str:
        """The source in words, for problem lines."""
        return f"the server log command `{self.command}`" if self.command is not None else (
            "standard input" if self.fd == 0 else f"fd {self.fd}")

    # --- public ----------------------------------------------------------------------------------------------

    def start(self) -> PipeLogFollower:
        """Start the command (or take the fd) and read it in greenlets; a command that cannot start is a problem."""
        if self._started is not None:
            raise RuntimeError("follower already started")
        self._started = self._last_read = time.monotonic()
        if self.command is not None:
            try:
                self._spawn(self.command)
            except Exception as exc:
                self._record(exc)
                self.note(f"{self.what} cannot start ({type(exc).__name__}: {exc}); no abort is confirmed "
                          "per request in this run")
                self._out_done.set()
                return self
        else:
            self._out = self.fd
        self._readers.append(gevent.spawn(self._read_out))
        if self._err is not None:
            self._readers.append(gevent.spawn(self._read_err))
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Linger for lines still in transit, then stop the command's process group (SIGTERM, then SIGKILL after
        `timeout`) and the readers. A source that said nothing in the whole run is a problem."""
        if self._started is None or self._stopped:
            return
        self._linger()
        self._stopping = True
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                if self._wait(timeout) is None:
                    self._signal_group(signal.SIGKILL)
                    self._wait(timeout)
            else:
                self._signal_group(signal.SIGTERM)  # what the shell left behind in its group, if anything
        # A command's pipes end once its group is gone; stdin does not end: what was there was read in _linger.
        gevent.joinall(self._readers, timeout=timeout if proc is not None else 0.0)
        for g in self._readers:
            if not g.dead:
                g.kill(block=True, timeout=timeout)
        self._close_fds()
        self._stopped = True
        if self.lines == 0 and self._readers and not self.ended_early:  # (cannot start / ended: said already)
            self.note(f"{self.what} printed nothing in the {time.monotonic() - self._started:.0f} s it was "
                      "read; no abort is confirmed per request in this run")

    @property
    def running(self) -> bool:
        """The log is being read (its stdout reader is alive)."""
        return bool(self._readers) and not self._readers[0].dead

    def describe(self) -> dict[str, Any]:
        exit_ = None
        if self.returncode is not None:
            exit_ = {"code": self.returncode, "after_s": self.exited_after, "during_run": self.ended_early}
        return {**super().describe(), "path": "-" if self.fd == 0 else None, "command": self.command,
                "pid": self.pid, "exit": exit_, "bytes": self.bytes, "overlong_lines": self.overlong,
                "stderr_lines": self.stderr_lines, "stderr_tail": list(self.stderr_tail)}

    # --- the command -----------------------------------------------------------------------------------------

    def _spawn(self, command: str) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            self._proc = gevent.subprocess.Popen(
                [_SHELL, "-c", command], stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                start_new_session=True, close_fds=True)
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        self.pid = self._proc.pid
        self._out, self._err = out_r, err_r

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)  # the command's own group: start_new_session made its PID the group's id

    def _wait(self, timeout: float) -> int | None:
        try:
            rc: int = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._exited(rc)
        return rc

    def _exited(self, rc: int) -> None:
        if self.returncode is None and self._started is not None:
            self.returncode = rc
            self.exited_after = time.monotonic() - self._started

    # --- the readers -----------------------------------------------------------------------------------------

    def _linger(self) -> None:
        began = time.monotonic()
        while not self._out_done.is_set():
            now = time.monotonic()
            idle = now - max(self._last_read, began)
            if idle >= self.quiet or now - began >= self.linger:
                return
            self._out_done.wait(min(self.quiet - idle, self.linger - (now - began)))

    def _read_out(self) -> None:
        fd = self._out
        assert fd is not None
        rest, skipping = b"", False
        try:
            while True:
                try:
                    wait_read(fd, timeout=self._silence_wait())
                except TimeoutError:
                    self._silent()
                    continue
                chunk = os.read(fd, self.chunk)
                if not chunk:
                    break
                seen = self._last_read = time.monotonic()
                self.bytes += len(chunk)
                whole, rest, skipping = self._split(rest, chunk, skipping)
                held = time.perf_counter()
                for i, raw in enumerate(whole):
                    self._handle(raw, seen)
                    if i % 16 == 15 and time.perf_counter() - held > _HOLD_S:
                        # A long chunk: let the loop run a cycle (timers, I/O; sleep(0) may not cycle it).
                        gevent.sleep(_YIELD_S)
                        held = time.perf_counter()
            if rest and not skipping:  # a last line without its newline
                self._handle(rest, time.monotonic())
        except OSError as exc:
            self._record(exc)
        finally:
            self._out_done.set()
        self._source_ended()

    def _read_err(self) -> None:
        fd = self._err
        assert fd is not None
        rest, skipping = b"", False
        try:
            while True:
                wait_read(fd)
                chunk = os.read(fd, self.chunk)
                if not chunk:
                    break
                whole, rest, skipping = self._split(rest, chunk, skipping)
                for raw in whole:
                    self._stderr_line(raw)
            if rest and not skipping:
                self._stderr_line(rest)
        except OSError as exc:
            self._record(exc)

    def _stderr_line(self, raw: bytes) -> None:
        self.stderr_lines += 1
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        if text.strip():
            self.stderr_tail.append(text[:500])

    def _split(self, rest: bytes, chunk: bytes, skipping: bool) -> tuple[list[bytes], bytes, bool]:
        """The whole lines `rest + chunk` ends, the unfinished rest, and whether that rest belongs to an overlong
        line being dropped (dropped as it comes: it is never held, nor counted twice)."""
        if skipping:
            cut = chunk.find(b"\n")
            if cut < 0:
                return [], b"", True
            rest, chunk, skipping = b"", chunk[cut + 1:], False
        *whole, rest = (rest + chunk).split(b"\n")
        if len(rest) > self.max_line:
            self.overlong += 1
            rest, skipping = b"", True
        return whole, rest, skipping

    def _silence_wait(self) -> float | None:
        if self._silence_told or self.lines or self.silent_after <= 0 or self._started is None:
            return None
        return max(0.0, self._started + self.silent_after - time.monotonic())

    def _silent(self) -> None:
        self._silence_told = True
        if not self.lines:
            self.note(f"{self.what} has printed nothing in {self.silent_after:g} s: is it the server's log "
                      "(vLLM names every request only with --enable-log-requests)?")

    def _source_ended(self) -> None:
        """Standard output ended: the command is exiting (or stdin's writer is gone)."""
        if self._proc is not None:
            rc = self._proc.wait()  # cooperative; stop() kills the group if it lingers with its stdout closed
            self._exited(rc)
            if self._stopping:
                return
            self.ended_early = True
            for g in self._readers[1:]:
                g.join(0.5)  # its last words, for the line below
            said = f": {self.stderr_tail[-1]}" if self.stderr_tail else ""
            nothing = ", having printed nothing" if not self.lines else f" after {self.lines} lines"
            self.note(f"{self.what} exited with code {rc} {self.exited_after or 0.0:.1f} s into the run"
                      f"{nothing}{said}; aborts after that are not confirmed per request")
        elif not self._stopping:
            self.ended_early = True
            self.note(f"{self.what} ended after {self.lines} lines, during the run (whatever piped the log "
                      "in has exited); aborts after that are not confirmed per request")

    def _close_fds(self) -> None:
        for name in ("_out", "_err"):
            fd = getattr(self, name)
            setattr(self, name, None)
            if fd is not None and fd != self.fd:  # never the caller's fd (stdin)
                with contextlib.suppress(OSError):
                    os.close(fd)

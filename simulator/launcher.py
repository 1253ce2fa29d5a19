"""Start and stop a simulator in its own process: the embedded target of a run with no `--host`.

A separate process keeps the simulator's event loop off the load generator's CPU and its GIL, as a real
server would be. The child is told our PID and exits by itself if we die; we stop it by its PID only.

It runs in a session (and process group) of its own: a terminal's Ctrl-C, or `timeout`, signals the whole
foreground process group, and the simulator must outlive that signal long enough for the run's report to read
its ledger; the run stops it afterwards, by PID.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["READY_PREFIX", "EmbeddedSimulator", "SimulatorStartError"]

READY_PREFIX = "stopstorm-simulator listening on "
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


class SimulatorStartError(RuntimeError):
    """The simulator did not come up; the message says why and where its log is."""


class EmbeddedSimulator:
    """`python -m stopstorm.simulator` on a free loopback port, its stderr (the vLLM-like request log) in a file.

    Python flushes a redirected stderr line by line, so the file can be followed live.

    Use as a context manager, or `start()` (returns the base URL) and `stop()`.
    """

    def __init__(self, args: Sequence[str] = (), log_path: str | None = None, startup_timeout: float = 30.0) -> None:
        self.args = list(args)
        self.startup_timeout = startup_timeout
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="stopstorm-simulator-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self.url: str | None = None
        self._proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> str:
        if self._proc is not None:
            raise RuntimeError("simulator already started")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "stopstorm.simulator", "--host", "127.0.0.1", "--port", "0",
               "--parent-pid", str(os.getpid()), *self.args]
        with open(self.log_path, "a", encoding="utf-8") as stderr:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                                          text=True, env=env, start_new_session=True)
        try:
            self.url = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.url

    def _wait_ready(self) -> str:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        url = None
        while url is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SimulatorStartError(f"simulator did not start within {self.startup_timeout:.0f} s; "
                                          f"see {self.log_path}")
            ready, _, _ = select.select([proc.stdout], [], [], min(remaining, 0.5))
            if ready:
                line = proc.stdout.readline()
                if not line:
                    proc.wait(timeout=5)
                    raise SimulatorStartError(f"simulator exited with code {proc.returncode}: "
                                              f"{self._log_tail()}")
                if line.startswith(READY_PREFIX):
                    url = line[len(READY_PREFIX):].strip()
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return url
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None:
                raise SimulatorStartError(f"simulator exited with code {proc.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise SimulatorStartError(f"simulator at {url} not healthy within {self.startup_timeout:.0f} s")
            time.sleep(0.05)

    def _log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:]).strip() or f"(empty log {self.log_path})"
        except OSError:
            return f"(no log at {self.log_path})"

    def stop(self, timeout: float = 5.0) -> int | None:
        """Terminate the child by its PID (SIGTERM, then SIGKILL after `timeout`); returns its exit code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL by PID, without waiting (a forced exit: nothing else may be left running)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def __enter__(self) -> EmbeddedSimulator:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

"""Per-stream server truth from llama-cpp-python's OpenAI server, for streams run one at a time (the probe).

llama-cpp-python has no ledger and no `/metrics`. What it does give (llama_cpp/server/app.py, 0.3.36):

- **its log**: after every chunk its stream loop asks `request.is_disconnected()`; when the client has gone it
  prints `Disconnected from client (via refresh/close) Address(host=…, port=…)` (stdout: run it with
  PYTHONUNBUFFERED=1, as scripts/real_llama_cpp.py does), the line followed here and stamped as read;
- **its one slot**: every request, `GET /v1/models` included, takes the same global lock (`get_llama_proxy`),
  held by a stream until it ends. So a `GET /v1/models` sent once the client's stream is over is answered
  only when the server has let go of that stream: its answer is the moment the slot was free (an upper bound:
  a few milliseconds of the request itself; or later, if the stream had ended before the request was sent).

`settle` returns a dict shaped like a simulator ledger entry, as metrics/truth/vllm_stream.py's does:

- `finish_reason`: `abort` when a disconnect line was read during the stream, else `finished` (the stream
  ran to its end: llama-cpp-python says nowhere whether by length or a stop token), else None (the slot was
  not free within the timeout);
- `freed`: the slot's free moment (above), or the abort line's stamp when that is earlier;
- `disconnect_seen`: when the abort line was read;
- `generated_tokens`: None: llama-cpp-python counts no tokens, so wasted tokens are not known here.

Needs its server started with `--interrupt_requests False`: by default the lock probe itself would end the
stream it waits for. A concurrent stream makes all of this wrong; callers run streams one at a time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import requests

from stopstorm.metrics.truth.server_profiles import AbortLine, match_abort, profile
from stopstorm.metrics.truth.vllm_log import LineFollower, LogFollower

__all__ = ["LLAMA_CPP_PYTHON_TRUTH_SOURCE", "DisconnectFollower", "LlamaCppPythonStreamTruth"]

LLAMA_CPP_PYTHON_TRUTH_SOURCE = ("llama-cpp-python log (disconnect line read) + its one lock (GET /v1/models "
                                 "answered once the stream let go)")
_PROFILE = profile("llama-cpp-python")
_WORD = b"Disconnected from client"


class DisconnectFollower(LogFollower):
    """Follows llama-cpp-python's log file and keeps each disconnect line, stamped as read."""

    def __init__(self, path: str | os.PathLike[str], poll: float = 0.02) -> None:
        super().__init__(path, poll=poll)
        self.disconnects: list[tuple[float, AbortLine]] = []

    def _handle(self, raw: bytes, seen: float) -> None:
        self.lines += 1
        if _WORD not in raw:
            return
        found = match_abort(_PROFILE, raw.decode("utf-8", errors="replace"))
        if found is not None:
            self.disconnects.append((seen, found))
            self.events += 1


@dataclass
class _Endpoint:
    """What the probe reports when the truth is missing (VllmStreamTruth's `metrics` has the same two)."""

    url: str
    last_error: str | None = None


class LlamaCppPythonStreamTruth:
    """Follows llama-cpp-python's log and probes its lock around each stream; see the module docstring."""

    def __init__(self, host: str, log: str | os.PathLike[str] | LineFollower, poll: float = 0.02) -> None:
        self.host = host.rstrip("/")
        self.metrics = _Endpoint(f"{self.host}/v1/models")
        self._unusable: str | None = None
        if isinstance(log, DisconnectFollower):
            self._owns_log, self.log = False, log
        elif isinstance(log, LogFollower):  # the plugin's follower of a file: follow the same file here
            self._owns_log, self.log = True, DisconnectFollower(log.path, poll)
        elif isinstance(log, LineFollower):
            self._owns_log, self.log = True, DisconnectFollower(os.devnull, poll)
            self._unusable = ("llama-cpp-python's truth follows its log file: give --server-log FILE (a command's "
                              "or standard input's log is read as vLLM's)")
        else:
            self._owns_log, self.log = True, DisconnectFollower(log, poll)
        self.session = requests.Session()
        self._mark = 0
        self._sent: float | None = None

    def start(self) -> LlamaCppPythonStreamTruth:
        if self._owns_log:
            self.log.start()
        return self

    def available(self) -> bool:
        """True when the server answers `GET /v1/models` (its slot is free: nothing else is streaming)."""
        if self._unusable is not None:
            self.metrics.last_error = self._unusable
            return False
        return self._slot_free(timeout=10.0) is not None

    def _slot_free(self, timeout: float) -> float | None:
        """When `GET /v1/models` was answered (it waits for the server's one lock); None if not within `timeout`."""
        try:
            resp = self.session.get(f"{self.host}/v1/models", timeout=timeout)
        except requests.RequestException as exc:
            self.metrics.last_error = f"{type(exc).__name__}: {exc}"
            return None
        at = time.monotonic()
        if resp.status_code != 200:
            self.metrics.last_error = f"GET /v1/models: {resp.status_code}"
            return None
        return at

    def before_stream(self) -> None:
        """Mark the log just before a stream is sent: its disconnect line is one read after this."""
        self.log.poll_once()
        self._mark = len(self.log.disconnects)
        self._sent = time.monotonic()

    def settle(self, server_id: str, timeout: float) -> dict[str, Any]:
        """The stream's truth once the server has let go of it (its lock is free), or as it is at `timeout`.
        `server_id` is kept for the caller's join; llama-cpp-python's line names the client, not the request."""
        if self._sent is None:
            raise RuntimeError("before_stream() was not called")
        free = self._slot_free(timeout)
        deadline = time.monotonic() + 0.5  # the line is printed just before the lock is let go: read it
        line: tuple[float, AbortLine] | None = None
        while True:
            self.log.poll_once()
            new = self.log.disconnects[self._mark:]
            if new:
                line = new[0]
                break
            if free is None or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if line is not None:
            reason: str | None = "abort"
            freed: float | None = min(line[0], free) if free is not None else line[0]
        else:
            reason, freed = ("finished", free) if free is not None else (None, None)
        return {
            "request_id": server_id,
            "finish_reason": reason,
            "freed": freed,
            "disconnect_seen": line[0] if line is not None else None,
            "generated_tokens": None,
            "log_added": True,  # llama-cpp-python logs no request ids: nothing to look up
            "log_client": list(line[1].client) if line is not None and line[1].client is not None else None,
            "slot_free": free,
        }

    def close(self) -> None:
        if self._owns_log:
            self.log.stop()
        self.session.close()

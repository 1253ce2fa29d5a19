"""Stream records on disk as they happen: one JSON line per finished stream, flushed at once, so a run killed
by anything (SIGKILL, a crash, a full disk later on) keeps every stream that ended before it.

The file is the run's raw client truth, in `StreamRecord.to_json()` form; a report can be rebuilt from it and
the ledger (metrics/analysis/accounting.py is pure). A new run truncates it, so one file holds one run.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import IO

import orjson

from stopstorm.metrics.record import StreamRecord

__all__ = ["RecordSink"]


class RecordSink:
    """An append-only JSONL file of stream records; `write` is safe from greenlets and threads alike."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[bytes] | None = self.path.open("wb")
        self._lock = threading.Lock()
        self.written = 0

    def write(self, record: StreamRecord) -> None:
        line = orjson.dumps(record.to_json(), default=str) + b"\n"
        with self._lock:
            if self._fh is None:
                return
            self._fh.write(line)
            self._fh.flush()
            self.written += 1

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

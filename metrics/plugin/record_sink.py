"""Stream records on disk as they happen: one JSON line per finished stream, flushed at once, so a run killed
by anything (SIGKILL, a crash, a full disk later on) keeps every stream that ended before it.

The file is the run's raw client truth, in `StreamRecord.to_json()` form; a report can be rebuilt from it and
the ledger (metrics/analysis/accounting.py is pure). A new run truncates it, so one file holds one run.

`RecordStore` is where a run keeps its records until the report: the same file, read back when the report is
built, instead of a list in memory. A capacity test runs for hours and every stream's record is ~1.5 KB in
memory (its per-chunk marks: benchmarks/bench_soak.py), so a list grew with the run; on disk the process stays
flat and the report still reads every record exactly as it was (orjson writes floats in their shortest exact
form, so each mark reads back bit for bit). With `--stopstorm-records` the store is that file; without, a
spool in the temp folder, removed once the report is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import orjson

from stopstorm.metrics.record import StreamRecord

__all__ = ["RecordSink", "RecordStore"]

_log = logging.getLogger("stopstorm")


class RecordSink:
    """An append-only JSONL file of stream records; `write` is safe from greenlets and threads alike."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[bytes] | None = self.path.open("wb")
        self._lock = threading.Lock()
        self.written = 0
        self.whole_bytes = 0  # the file's length up to its last whole line (a failed write may leave half of one)

    def write(self, record: StreamRecord) -> None:
        line = orjson.dumps(record.to_json(), default=str) + b"\n"
        with self._lock:
            if self._fh is None:
                return
            self._fh.write(line)
            self._fh.flush()
            self.written += 1
            self.whole_bytes += len(line)

    def close(self) -> None:
        with self._lock:
            fh, self._fh = self._fh, None
            if fh is not None:
                with contextlib.suppress(OSError):  # after a failed write its flush fails again; closed all the same
                    fh.close()


class RecordStore:
    """A run's finished streams, kept on disk until its report reads them back (`__iter__`, in the order they
    finished). Nothing is lost when the disk fails: from the first failed write on, records are kept in memory
    (said once), and the file's whole lines before it still count."""

    def __init__(self, path: str | Path | None = None, *, spool: bool = True) -> None:
        """`path`: the user's `--stopstorm-records` file (kept); None: a spool in the temp folder (`discard`ed
        once the report is written), or with `spool=False` memory only (no run yet, or no file could be made).
        Raises OSError when the file cannot be made."""
        self.kept = path is not None
        if path is None and spool:
            fd, name = tempfile.mkstemp(prefix=f"stopstorm-records-{os.getpid()}-", suffix=".jsonl")
            os.close(fd)
            path = name
        self.sink: RecordSink | None = RecordSink(path) if path is not None else None
        self.path: Path | None = self.sink.path if self.sink is not None else None
        self._in_memory: list[StreamRecord] = []  # after a failed write, or with no file at all
        self._on_disk = 0  # records whose whole line is in the file
        self._whole_bytes = 0

    def append(self, record: StreamRecord) -> None:
        sink = self.sink
        if sink is not None:
            try:
                sink.write(record)
                self._on_disk, self._whole_bytes = sink.written, sink.whole_bytes
                return
            except OSError as exc:  # the run goes on; the report still gets every record
                what = "--stopstorm-records " if self.kept else "the record spool "
                _log.error("stopstorm: writing %s%s failed (%s); records are kept in memory from here on", what,
                           sink.path, exc)
                sink.close()
                self.sink = None
        record.compact()  # its per-chunk marks packed (benchmarks/bench_soak.py)
        self._in_memory.append(record)

    def __len__(self) -> int:
        return self._on_disk + len(self._in_memory)

    def __iter__(self) -> Iterator[StreamRecord]:
        """Every record so far: the file's whole lines, then those kept in memory."""
        on_disk, whole = self._on_disk, self._whole_bytes  # as of now: records finishing meanwhile come next time
        if on_disk and self.path is not None:
            with self.path.open("rb") as fh:
                for _ in range(on_disk):  # a line at a time: the file may be far larger than one record
                    line = fh.readline(max(whole - fh.tell(), 0))
                    if not line.endswith(b"\n"):
                        break  # the file was cut under us (it is the user's): what is whole is read
                    record = StreamRecord.from_wire(orjson.loads(line))  # derived figures in the line: ignored
                    record.compact()
                    yield record
        yield from list(self._in_memory)

    @property
    def written(self) -> int:
        """Records in the file (what `--stopstorm-records` holds)."""
        return self._on_disk

    def close(self) -> None:
        """No more writes to the file (the run ended; a straggler's record is kept in memory); it stays readable."""
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.close()

    def discard(self) -> None:
        """The report has read the records: closed, and a spool of our own removed with what it held (a
        user's --stopstorm-records file stays, and still counts)."""
        self.close()
        if not self.kept and self.path is not None:
            with contextlib.suppress(OSError):  # a spool left in the temp folder is no reason to fail a report
                self.path.unlink()
            self._on_disk = self._whole_bytes = 0
            self._in_memory = []

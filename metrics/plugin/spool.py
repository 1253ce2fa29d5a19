"""One JSON line per item on disk, written as the run goes and read back once for the report: how a run keeps
its stream records (record_sink.py) and the simulator's drained ledger entries (ledger_drain.py) without
holding either in memory for hours.

Both need the same care, so it lives here once: a line is flushed as it is written (a run killed by anything
keeps what was written before), only whole lines count (a failed write may leave half of one, and a user's
file may be cut under us), a failed write loses nothing (from then on items are kept in memory, said once),
and a spool of our own in the temp folder is removed once read, while a file the user named stays.
orjson writes floats in their shortest exact form, so every value reads back bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import orjson

__all__ = ["JsonlSpool"]

_log = logging.getLogger("stopstorm")

T = TypeVar("T")


class JsonlSpool(Generic[T]):
    """Items appended as JSON lines (`encode` gives each line's JSON value, `decode` takes it back), read back in
    the order they came (`__iter__`); `append` is safe from greenlets and threads alike."""

    def __init__(self, what: str, encode: Callable[[T], Any], decode: Callable[[Any], T], *,
                 path: str | Path | None = None, temp_prefix: str | None = None,
                 to_memory: Callable[[T], None] | None = None) -> None:
        """`what` names the file in messages ("--stopstorm-records", "the ledger spool"). `path`: a file the
        user named, made (or truncated) here and kept; else with `temp_prefix` a temp file of our own
        (`stopstorm-<prefix>-<pid>-*.jsonl`, removed by `discard`); neither: memory only. `to_memory` readies an
        item kept in memory (a record packs its marks). Raises OSError when the file cannot be made."""
        self.what = what
        self._encode, self._decode, self._to_memory = encode, decode, to_memory
        self.kept = path is not None
        self._fh: IO[bytes] | None = None
        if path is not None:
            self.path: Path | None = Path(path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("wb")
        elif temp_prefix is not None:
            fd, name = tempfile.mkstemp(prefix=f"stopstorm-{temp_prefix}-{os.getpid()}-", suffix=".jsonl")
            self.path = Path(name)
            self._fh = os.fdopen(fd, "wb")
        else:
            self.path = None
        self._lock = threading.Lock()
        self._on_disk = 0  # items whose whole line is in the file
        self._whole_bytes = 0  # the file's length up to its last whole line
        self._in_memory: list[T] = []  # after a failed write, after `close`, or with no file at all

    def append(self, item: T) -> None:
        with self._lock:
            fh = self._fh
            if fh is not None:
                line = orjson.dumps(self._encode(item), default=str) + b"\n"
                try:
                    fh.write(line)
                    fh.flush()
                except OSError as exc:  # a full disk: the run goes on, and the report still gets every item
                    _log.error("stopstorm: writing %s %s failed (%s); from here on it is kept in memory", self.what,
                               self.path, exc)
                    self._fh = None
                    with contextlib.suppress(OSError):  # its flush fails again; closed all the same
                        fh.close()
                else:
                    self._on_disk += 1
                    self._whole_bytes += len(line)
                    return
            if self._to_memory is not None:
                self._to_memory(item)
            self._in_memory.append(item)

    def __len__(self) -> int:
        return self._on_disk + len(self._in_memory)

    @property
    def written(self) -> int:
        """Items whose line is whole in the file."""
        return self._on_disk

    def __iter__(self) -> Iterator[T]:
        """Every item so far: the file's whole lines, then those kept in memory."""
        with self._lock:  # as of now: items appended meanwhile come next time
            on_disk, whole, in_memory = self._on_disk, self._whole_bytes, list(self._in_memory)
        if on_disk and self.path is not None:
            with self.path.open("rb") as fh:
                for _ in range(on_disk):  # a line at a time: the file may be far larger than memory should hold
                    line = fh.readline(max(whole - fh.tell(), 0))
                    if not line.endswith(b"\n"):
                        break  # the file was cut under us (a user's file): what is whole is read
                    yield self._decode(orjson.loads(line))
        yield from in_memory

    def close(self) -> None:
        """No more writes to the file (a straggler is kept in memory); it stays readable."""
        with self._lock:
            fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()

    def discard(self) -> None:
        """Read: closed, and a spool of our own removed with what it held (a user's file stays, and still
        counts)."""
        self.close()
        if not self.kept and self.path is not None:
            with contextlib.suppress(OSError):  # a spool left in the temp folder is no reason to fail a report
                self.path.unlink()
            self.path = None
            with self._lock:
                self._on_disk = self._whole_bytes = 0
                self._in_memory = []

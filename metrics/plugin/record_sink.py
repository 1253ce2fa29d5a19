"""Stream records on disk as they happen: one JSON line per finished stream, flushed at once, so a run killed
by anything (SIGKILL, a crash, a full disk later on) keeps every stream that ended before it.

The file is the run's raw client truth, in `StreamRecord.to_json()` form; a report can be rebuilt from it and
the ledger (metrics/analysis/accounting.py is pure). A new run truncates it, so one file holds one run.

`RecordStore` is where a run keeps its records until the report: the same file, read back when the report is
built, instead of a list in memory. A capacity test runs for hours and every stream's record is ~1.5 KB in
memory (its per-chunk marks: benchmarks/bench_soak.py), so a list grew with the run; on disk the process stays
flat and the report still reads every record exactly as it was (each mark reads back bit for bit). With
`--stopstorm-records` the store is that file; without, a spool in the temp folder, removed once the report is
written. The file's care (whole lines only, memory after a failed write) is metrics/plugin/spool.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stopstorm.metrics.plugin.spool import JsonlSpool
from stopstorm.metrics.record import StreamRecord

__all__ = ["RecordStore"]


def _encode(record: StreamRecord) -> dict[str, Any]:
    return record.to_json()


def _decode(value: Any) -> StreamRecord:
    record = StreamRecord.from_wire(value)  # derived figures in the line: ignored
    record.compact()
    return record


class RecordStore(JsonlSpool[StreamRecord]):
    """A run's finished streams, kept on disk until its report reads them back (iterated, in the order they
    finished). Nothing is lost when the disk fails: from the first failed write on, records are kept in memory
    (said once), and the file's whole lines before it still count."""

    def __init__(self, path: str | Path | None = None, *, spool: bool = True) -> None:
        """`path`: the user's `--stopstorm-records` file (kept: `written` is what it holds); None: a spool in the
        temp folder (`discard`ed once the report is written), or with `spool=False` memory only (no run yet, or
        no file could be made). Raises OSError when the file cannot be made."""
        super().__init__("--stopstorm-records" if path is not None else "the record spool", _encode, _decode,
                         path=path, temp_prefix="records" if spool else None,
                         to_memory=StreamRecord.compact)  # its per-chunk marks packed (benchmarks/bench_soak.py)

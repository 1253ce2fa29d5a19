"""A figure: one number (or distribution, count table, finding) with its unit and the truth it comes from.

The vocabulary the analysis computes in and every report view shows. The sources name where a figure's truth
lives, so nobody mistakes a client's belief for the server's: see stopstorm/metrics/analysis/accounting.py for
what each one means. A figure whose truth is missing is None with source `unavailable`, never 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, cast

__all__ = [
    "CLIENT_ESTIMATE",
    "CLIENT_SOURCE",
    "LEDGER_SOURCE",
    "LOG_SOURCE",
    "METRICS_SOURCE",
    "UNAVAILABLE",
    "Distribution",
    "Figure",
    "Table",
    "Value",
    "distribution",
    "unknown",
]

LEDGER_SOURCE = "simulator ledger"
METRICS_SOURCE = "vLLM metrics"
LOG_SOURCE = "vLLM log"
CLIENT_SOURCE = "client records"
CLIENT_ESTIMATE = "client estimate"
UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class Distribution:
    """Summary of a sample, in the unit of its figure. Percentiles interpolate linearly between ranks."""

    count: int
    p50: float
    p90: float
    p95: float
    p99: float
    max: float
    mean: float

    def to_json(self) -> dict[str, float | int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, doc: Any) -> Distribution | None:
        """A distribution as `to_json` wrote it; None for anything else (null, a number, a partial object)."""
        if not isinstance(doc, Mapping) or any(f.name not in doc for f in fields(cls)):
            return None
        return cls(int(doc["count"]), *(float(doc[f.name]) for f in fields(cls)[1:]))


Value = int | float | str | dict[str, int] | Distribution | None


@dataclass(frozen=True, slots=True)
class Figure:
    """One number (or distribution, count table, finding) with its unit and where it comes from."""

    value: Value
    unit: str
    source: str
    note: str | None = None  # e.g. "aggregate": not a per-stream sum

    @property
    def known(self) -> bool:
        return self.value is not None

    def to_json(self) -> dict[str, Any]:
        """{"value", "unit", "source"} and "note" when there is one (the report's FIGURE)."""
        value = self.value.to_json() if isinstance(self.value, Distribution) else self.value
        out: dict[str, Any] = {"value": value, "unit": self.unit, "source": self.source}
        if self.note is not None:
            out["note"] = self.note
        return out

    @classmethod
    def from_json(cls, doc: Any, unit: str = "") -> Figure:
        """A FIGURE read back from a saved report; a missing one is unavailable (never 0)."""
        if not isinstance(doc, Mapping):
            return cls(None, unit, UNAVAILABLE)
        v = doc.get("value")
        value: Value = Distribution.from_json(v) if isinstance(v, Mapping) and "p50" in v else cast(Value, v)
        return cls(value, str(doc.get("unit", unit)), str(doc.get("source", UNAVAILABLE)), doc.get("note"))


def _percentile(ordered: list[float], q: float) -> float:
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def distribution(values: Iterable[float]) -> Distribution | None:
    """Count, percentiles, max and mean; None for an empty sample."""
    ordered = sorted(values)
    if not ordered:
        return None
    return Distribution(len(ordered), _percentile(ordered, 0.50), _percentile(ordered, 0.90),
                        _percentile(ordered, 0.95), _percentile(ordered, 0.99), ordered[-1],
                        math.fsum(ordered) / len(ordered))


@dataclass(frozen=True, slots=True)
class Table:
    """Rows under named columns (a timeline, a trace): compact in JSON, one list per row."""

    columns: tuple[str, ...]
    rows: Sequence[Sequence[Any]]
    source: str | None = None

    def column(self, name: str) -> list[Any]:
        i = self.columns.index(name)
        return [r[i] for r in self.rows]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"columns": list(self.columns), "rows": [list(r) for r in self.rows]}
        if self.source is not None:
            out["source"] = self.source
        return out

    @classmethod
    def from_json(cls, doc: Any, columns: Sequence[str] = ()) -> Table:
        d = doc if isinstance(doc, Mapping) else {}
        return cls(tuple(d.get("columns") or columns), [list(r) for r in d.get("rows") or []], d.get("source"))


def unknown(unit: str, note: str | None = None) -> Figure:
    """A figure whose truth was not available this run."""
    return Figure(None, unit, UNAVAILABLE, note)

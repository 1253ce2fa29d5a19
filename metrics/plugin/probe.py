"""The stop-semantics probe's results: collected as the probe user (stopstorm/users/probe.py) walks its matrix,
printed after Locust's own summary and written as JSON when Locust quits.

The probe user hands each judged stream here (`PROBE.add`), so the Locust wiring stays in this package and the
users never need to be imported by it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from locust import events

from stopstorm.metrics.analysis.probe import PROBE_SCHEMA_VERSION, ProbeSample, summarise
from stopstorm.metrics.figures import LEDGER_SOURCE
from stopstorm.metrics.plugin.state import RUN
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.report.probe_table import format_table

__all__ = ["PROBE", "ProbeResults"]

_LIBRARIES = ("requests", "httpx", "openai", "geventhttpclient", "locust", "gevent")


@dataclass
class ProbeResults:
    """Every probed stream with the server's truth about it, and which truth judged them."""

    streams: list[tuple[StreamRecord, dict[str, Any] | None]] = field(default_factory=list)
    truth_source: str = LEDGER_SOURCE  # the simulator ledger, or vLLM's log + /metrics

    def add(self, record: StreamRecord, truth: dict[str, Any] | None) -> None:
        self.streams.append((record, truth))

    def write(self, path: str, host: str) -> str:
        """Write the JSON; returns the table."""
        cells = summarise(ProbeSample.from_pair(record, entry) for record, entry in self.streams)
        doc = {
            "schema_version": PROBE_SCHEMA_VERSION,
            "host": host,
            "truth_source": self.truth_source,
            "versions": _library_versions(),
            "cells": [dataclasses.asdict(c) for c in cells],
            "streams": [{"record": r.to_json(), "ledger": e} for r, e in self.streams],
        }
        with open(path, "wb") as f:
            f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        return format_table(cells)


PROBE = ProbeResults()


def _library_versions() -> dict[str, str]:
    out = {}
    for dist in _LIBRARIES:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


@events.quit.add_listener
def _print_probe_table(**_kwargs: Any) -> None:
    env = RUN.environment
    if not PROBE.streams or env is None:
        return
    path = env.parsed_options.probe_json
    table = PROBE.write(path, env.host)
    print(f"\nstopstorm stop-semantics probe (truth: {PROBE.truth_source}; JSON: {path})\n{table}\n", flush=True)

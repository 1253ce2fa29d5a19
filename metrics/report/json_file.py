"""The report as a JSON file (layout in stopstorm/metrics/report/model.py), written atomically: a temp file
beside it, then a rename over it, so a reader never sees half a report."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import orjson

from stopstorm.metrics.redact import redact_tree
from stopstorm.metrics.report.model import Report, report_from_json, report_to_json

__all__ = ["read_report", "write_report"]


def write_report(path: str | os.PathLike[str], report: Report) -> Path:
    """Write `report` to `path`; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            # no key, no password, wherever a server's or a library's words put one (metrics/redact.py)
            fh.write(orjson.dumps(redact_tree(report_to_json(report)), default=str, option=orjson.OPT_INDENT_2))
            fh.write(b"\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_report(path: str | os.PathLike[str]) -> Report:
    """A saved report; ValueError naming the file when it cannot be read or is not a stopstorm report."""
    try:
        doc = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"cannot read report {path}: {exc}") from None
    try:
        return report_from_json(doc)
    except ValueError as exc:
        raise ValueError(f"{path} is {exc}") from None

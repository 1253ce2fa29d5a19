"""What several benchmarks do the same way: pin a process's every thread to one CPU, read a JSON endpoint."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from typing import Any

__all__ = ["get_json", "pin"]


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of a process (sched_setaffinity on a PID moves only that thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), {cpu})


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())

"""Print a recorded server log at a pace, as `kubectl logs -f` or `ssh host tail -F` would: the test command for
metrics/truth/log_command.py.

    python tests/log_player.py LOG [--interval S] [--history N] [--restamp] [--marks FILE]
                                   [--die-after N --exit CODE --stderr TEXT] [--then-sleep S]

`--history N` prints the first N lines at once, as they were recorded (a command replaying history); the rest
follow one every `--interval` seconds, with `--restamp` each stamped now (MM-DD HH:MM:SS, local time) as if
the server wrote it then. `--marks FILE` gets "<time.monotonic()> <line number>" for every line as it is
flushed. `--die-after N` exits with `--exit` after N lines (saying `--stderr` on stderr first); otherwise it
sleeps `--then-sleep` seconds at the end (a follower keeps waiting), then exits 0.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

STAMP = re.compile(r"\b\d\d-\d\d \d\d:\d\d:\d\d\b")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("log")
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--history", type=int, default=0)
    p.add_argument("--restamp", action="store_true")
    p.add_argument("--marks")
    p.add_argument("--die-after", type=int)
    p.add_argument("--exit", type=int, default=1)
    p.add_argument("--stderr", default="")
    p.add_argument("--then-sleep", type=float, default=0.0)
    a = p.parse_args()
    with open(a.log, encoding="utf-8", errors="replace", newline="") as f:  # the file's own lines: "\n" only
        lines = f.read().removesuffix("\n").split("\n")
    marks = open(a.marks, "a", encoding="utf-8") if a.marks else None  # noqa: SIM115
    for i, text in enumerate(lines):
        if a.die_after is not None and i >= a.die_after:
            if a.stderr:
                print(a.stderr, file=sys.stderr, flush=True)
            return a.exit
        live = i >= a.history
        if live and i > a.history:
            time.sleep(a.interval)
        if live and a.restamp:
            text = STAMP.sub(time.strftime("%m-%d %H:%M:%S"), text, count=1)
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        if marks is not None:
            marks.write(f"{time.monotonic()!r} {i}\n")
            marks.flush()
    if a.die_after is not None:
        if a.stderr:
            print(a.stderr, file=sys.stderr, flush=True)
        return a.exit
    time.sleep(a.then_sleep)
    return 0


if __name__ == "__main__":
    sys.exit(main())

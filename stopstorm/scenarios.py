"""Scenarios back to back against one server, then side by side: `stopstorm scenarios --scenario NAME="ARGS" …`.

    stopstorm scenarios --scenario prompt="--close-mix close:1" \\
        --scenario zombies="--close-mix hold:1 --hold-seconds 3" --out runs -- \\
        --headless -u 40 -r 40 -t 30s --arrival-rate 3 --max-tokens 100 --ignore-eos RequestsUser

Comparing runs is only fair against the same server in the same state, so this starts one simulator (or uses
`--host`), runs `locust -f locustfile.py` once per scenario against it with the common arguments after `--` plus
the scenario's own, resets the simulator's ledger between runs, and ends with the comparison table
(metrics/report/compare.py) and one HTML page for all (`OUT/compare.html`); each run's own JSON and HTML report are in
OUT as NAME.json / NAME.html. A scenario that fails is reported and the others still run.

A single short run says little about the next: `--repeat N` runs every scenario N times, interleaved (A, B, A,
B, …, so a drift of the machine's load falls on all alike), as NAME.1.json … NAME.N.json, and the comparison
pools each scenario's repeats (the median, the spread, n summed, queue-wait samples pooled for the bootstrap
interval), saying which differences lie within their noise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

import requests

from stopstorm.metrics.report.compare import format_table, load_scenarios
from stopstorm.metrics.report.html_page import render_html
from stopstorm.simulator.launcher import EmbeddedSimulator

# The shipped locustfile, and the folder that holds the `stopstorm` package (the checkout or site-packages).
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
_IMPORT_ROOT = Path(__file__).resolve().parent.parent


def _scenario(text: str) -> tuple[str, list[str]]:
    name, sep, args = text.partition("=")
    if not sep or not name.strip() or not name.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"--scenario: expected NAME=\"locust args\" (NAME in letters, digits, - "
                                         f"and _), got {text!r}")
    return name.strip(), shlex.split(args)


def run_scenarios(host: str, scenarios: list[tuple[str, list[str]]], common: list[str], out: Path,
                  timeout_s: float, repeat: int = 1) -> list[tuple[str, Path]]:
    """Each scenario `repeat` times against `host`, interleaved; (scenario name, report) of those written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = (str(_IMPORT_ROOT), os.environ.get("PYTHONPATH"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    written: list[tuple[str, Path]] = []
    runs = [(name, args, k) for k in range(1, repeat + 1) for name, args in scenarios]
    for name, args, k in runs:
        with contextlib.suppress(requests.RequestException):  # a fresh ledger per scenario; real vLLM has none
            requests.post(f"{host}/stopstorm/ledger/reset", timeout=5)
        stem = name if repeat == 1 else f"{name}.{k}"
        report = out / f"{stem}.json"
        cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", host, *common, *args,
               "--stopstorm-report", str(report)]
        print(f"scenario {stem}: {shlex.join(cmd[2:])}", flush=True)
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout_s, check=False, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            print(f"scenario {stem}: did not end within {timeout_s:g} s (set -t); skipped", flush=True)
            continue
        (out / f"{stem}.log").write_text(proc.stdout + proc.stderr)
        if report.exists():
            written.append((name, report))
        else:
            print(f"scenario {stem}: no report (exit status {proc.returncode}); see {out / (stem + '.log')}",
                  flush=True)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    common: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, common = argv[:k], argv[k + 1:]
    ap = argparse.ArgumentParser(prog="stopstorm scenarios", description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", type=_scenario, action="append", required=True,
                    help='NAME="locust args" (repeat); the first is the comparison\'s baseline')
    ap.add_argument("--host", default="", help="server to load (default: start the embedded simulator once)")
    ap.add_argument("--sim-args", default="--max-num-seqs 4", help="flags for the embedded simulator")
    ap.add_argument("--out", default="stopstorm-scenarios", help="folder for the reports (default stopstorm-scenarios)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one scenario may run (default 900)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each scenario, interleaved; the comparison shows their spread (default 1)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    out = Path(args.out)
    sim = None
    host = args.host
    if not host:
        sim = EmbeddedSimulator(shlex.split(args.sim_args))
        host = sim.start()
        print(f"embedded simulator at {host} ({args.sim_args}); its log: {sim.log_path}", flush=True)
    try:
        reports = run_scenarios(host, args.scenario, common, out, args.timeout, args.repeat)
    finally:
        if sim is not None:
            sim.stop()
    if not reports:
        print("no scenario wrote a report", file=sys.stderr)
        return 1
    docs = load_scenarios([str(p) for _name, p in reports], with_replay=True, labels=[name for name, _p in reports])
    print("\n" + format_table(docs))
    page = out / "compare.html"
    page.write_text(render_html(docs, title="stopstorm scenarios"), encoding="utf-8")
    print(f"\nHTML: {page}")
    return 0 if len(reports) == len(args.scenario) * args.repeat else 1


if __name__ == "__main__":
    sys.exit(main())

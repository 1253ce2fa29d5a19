"""The `stopstorm` command: Locust with stopstorm's shipped locustfile, and the few tools around a run.

    stopstorm [LOCUST ARGS]             = locust -f <the shipped locustfile.py> [LOCUST ARGS]
    stopstorm probe [LOCUST ARGS]       the stop-semantics probe (probe.py)
    stopstorm capacity [LOCUST ARGS]    the SLO step search (capacity.py)
    stopstorm scenarios ...             scenarios back to back, then side by side
    stopstorm compare REPORT ...        saved reports side by side
    stopstorm replay REPORT ...         a saved run replayed under other abort policies or sizes
    stopstorm simulator ...             the embedded simulator on its own (python -m stopstorm.simulator)

Everything after the subcommand is the tool's own command line; for a run it is Locust's, stopstorm's options
included (`stopstorm --help` lists both, grouped: Locust prints its help before it imports a locustfile, so this
command imports the locustfile first). A `-f` of your own replaces the shipped locustfile.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["LOCUSTFILES", "main"]

_HERE = Path(__file__).resolve().parent
# The locustfiles that ship in the package (in a checkout they are the repository's top-level files).
LOCUSTFILES = {"run": _HERE / "locustfile.py", "probe": _HERE / "probe.py", "capacity": _HERE / "capacity.py"}


def _has_locustfile(args: Sequence[str]) -> bool:
    return any(a in ("-f", "--locustfile") or a.startswith(("-f=", "--locustfile=")) for a in args)


# Options whose value is itself a command line: `--sim-args "--gpu-work"` is read by argparse as an option with no
# value, so the value is joined to its option (`--sim-args=--gpu-work`) before Locust parses it.
_COMMAND_LINE_VALUES = ("--sim-args",)


def _join_option_values(args: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in _COMMAND_LINE_VALUES and i + 1 < len(args) and args[i + 1].startswith("-"):
            out.append(f"{a}={args[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _locust(locustfile: Path, args: list[str]) -> int:
    """Run Locust's own main with `locustfile` unless the command line names one."""
    import locust  # noqa: F401  (first: its gevent monkey-patching must precede every other import)

    args = _join_option_values(args)
    if not _has_locustfile(args):
        args = ["-f", str(locustfile), *args]
    if any(a in ("-h", "--help") for a in args):
        # Locust prints --help before importing the locustfile; import it first so its options are registered.
        import importlib.util

        path = Path(args[args.index("-f") + 1]) if "-f" in args else locustfile
        spec = importlib.util.spec_from_file_location("_stopstorm_help_locustfile", path)
        if spec is not None and spec.loader is not None:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
    from locust.main import main as locust_main

    sys.argv = ["stopstorm", *args]
    locust_main()  # exits with Locust's status
    return 0


def _compare(argv: list[str]) -> int:
    import argparse

    from stopstorm.metrics.report.compare import format_table, load_scenarios
    from stopstorm.metrics.report.html_page import render_html

    ap = argparse.ArgumentParser(prog="stopstorm compare", description="Saved stopstorm reports side by side; the "
                                 "first is the baseline, every other gets its delta against it.")
    ap.add_argument("reports", nargs="+", help="stopstorm report JSON files; the first is the baseline")
    ap.add_argument("--replay", action="store_true",
                    help="add each report's replay counterfactuals (perfect aborts, no stops) as scenarios")
    ap.add_argument("--html", default="", help="also write the side-by-side HTML report here")
    args = ap.parse_args(argv)
    docs = load_scenarios(args.reports, with_replay=args.replay)
    print(format_table(docs))
    if args.html:
        Path(args.html).write_text(render_html(docs, title="stopstorm comparison"), encoding="utf-8")
        print(f"\nHTML: {args.html}")
    return 0


def _replay(argv: list[str]) -> int:
    from stopstorm.metrics.report.replay_table import main as replay_main

    return replay_main(argv)


def _scenarios(argv: list[str]) -> int:
    from stopstorm.scenarios import main as scenarios_main

    return scenarios_main(argv)


def _simulator(argv: list[str]) -> int:
    from stopstorm.simulator.__main__ import main as simulator_main

    simulator_main(argv)
    return 0


_TOOLS: dict[str, Callable[[list[str]], int]] = {
    "compare": _compare, "replay": _replay, "scenarios": _scenarios, "simulator": _simulator,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else ""
    if command in _TOOLS:
        return _TOOLS[command](args[1:])
    if command in ("probe", "capacity"):
        return _locust(LOCUSTFILES[command], args[1:])
    return _locust(LOCUSTFILES["run"], args)


if __name__ == "__main__":
    sys.exit(main())

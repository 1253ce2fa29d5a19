"""The embedded simulator: with no `--host`, the run starts one (its own process in its own session, a free
loopback port), points Locust at it, and stops it by PID when Locust quits (normal end, Ctrl-C, SIGTERM or an
error), after the run report has read its ledger. A Ctrl-C to the terminal's process group does not reach it
(simulator/launcher.py); a forced exit (a third signal, metrics/plugin/signals.py) kills it by PID first. Its
options are here too, so `stopstorm --help` groups them."""

from __future__ import annotations

import atexit
import logging
import shlex
from typing import Any, NoReturn

from stopstorm.metrics.plugin import options, signals
from stopstorm.metrics.plugin.state import RUN
from stopstorm.simulator.config import build_parser, config_from_args
from stopstorm.simulator.faults import FaultPlan
from stopstorm.simulator.launcher import EmbeddedSimulator

__all__ = ["TABLE", "embedded_simulator", "simulator_args", "start_simulator", "stop_simulator"]

_log = logging.getLogger("stopstorm")


MAX_NUM_SEQS = 100_000
_SET_BY_STOPSTORM = ("--host", "--port", "--parent-pid")  # the launcher's: a free loopback port, our PID


def _starts(opts: Any) -> bool:
    """The embedded simulator is used: no --host (checked where it would start, never on a worker)."""
    return not getattr(opts, "host", None)


def simulator_args(opts: Any) -> list[str]:
    """The embedded simulator's command line (`--max-num-seqs N` and `--sim-args`), parsed with the simulator's
    own parser, so a flag it does not know, a bad value or an unclosed quote is refused before it starts."""
    text = getattr(opts, "sim_args", "") or ""
    try:
        extra = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"--sim-args {text!r}: {exc} (quote it as a shell would)") from None
    for arg in extra:
        flag = arg.partition("=")[0]
        if flag in _SET_BY_STOPSTORM:
            raise ValueError(f"--sim-args {text!r}: {flag} is set by stopstorm (the embedded simulator listens on a "
                             "free loopback port); run it yourself to choose: stopstorm simulator --help")
        if flag in ("-h", "--help"):
            raise ValueError(f"--sim-args {text!r}: for the simulator's flags run: stopstorm simulator --help")
    args = ["--max-num-seqs", str(getattr(opts, "sim_max_num_seqs", 2)), *extra]
    parser = build_parser()

    def refuse(message: str) -> NoReturn:
        raise ValueError(f"--sim-args {text!r}: {message} (see stopstorm simulator --help)")

    setattr(parser, "error", refuse)  # noqa: B010  (argparse's error exits; this one raises, for one line and exit 2)
    setattr(parser, "exit", lambda status=0, message=None: refuse(message or "the simulator's parser exited"))  # noqa: B010
    config = config_from_args(parser.parse_args(args))
    try:
        FaultPlan(config.faults)
    except ValueError as exc:
        refuse(str(exc))
    return args


TABLE = options.OptionTable("stopstorm embedded simulator", description="used when no --host is given", options=(
    options.Option("--sim-max-num-seqs", "running slots of the embedded simulator, as vLLM's --max-num-seqs "
                   "(default 2)", 2, options.Number(low=1, high=MAX_NUM_SEQS, integer=True), int),
    options.Option("--sim-args", "more flags for the embedded simulator, e.g. \"--step-base-ms 20 --seed 1\" (see "
                   "stopstorm simulator --help); parsed with the simulator's own parser before it starts", ""),
    options.Option("--sim-log", "file for the embedded simulator's vLLM-like request log (default: a temp file)",
                   "", options.WritablePath(optional=True), master_only=True, when=_starts),
))


def _check(opts: Any) -> None:
    if _starts(opts) and hasattr(opts, "sim_args"):
        simulator_args(opts)


options.register(TABLE, _check, rank=50)


def embedded_simulator() -> EmbeddedSimulator | None:
    """The simulator this process started, if any."""
    return RUN.simulator


def start_simulator(environment: Any) -> None:
    """Start the embedded simulator and point the run at it."""
    opts = environment.parsed_options
    args = simulator_args(opts)  # checked at init, before this
    # stopstorm is its one reader: what the run has drained is dropped (metrics/plugin/ledger_drain.py)
    sim = EmbeddedSimulator([*args, "--forget-read-ledger"], log_path=getattr(opts, "sim_log", "") or None)
    url = sim.start()
    RUN.simulator = sim
    atexit.register(stop_simulator)
    signals.on_force(_kill_simulator)
    environment.host = url
    if opts is not None:
        opts.host = url
    _log.info("no --host given: started the embedded simulator at %s (pid %s, %s); its log: %s",
              url, sim.pid, " ".join(args), sim.log_path)


def _kill_simulator() -> None:
    sim = RUN.simulator
    if sim is not None:
        sim.kill()


def stop_simulator(**_kwargs: Any) -> None:
    """Stop it by PID (a listener of Locust's quit, registered last, and atexit)."""
    sim, RUN.simulator = RUN.simulator, None
    if sim is not None:
        code = sim.stop()
        _log.info("stopped the embedded simulator (exit status %s); its log: %s", code, sim.log_path)

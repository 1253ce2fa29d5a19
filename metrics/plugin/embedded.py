"""The embedded simulator: with no `--host`, the run starts one (its own process, a free loopback port), points
Locust at it, and stops it by PID when Locust quits (normal end, Ctrl-C, SIGTERM or an error), after the run
report has read its ledger. Its options are here too, so `stopstorm --help` groups them."""

from __future__ import annotations

import atexit
import logging
import shlex
from typing import Any

from locust.argument_parser import LocustArgumentParser

from stopstorm.metrics.plugin import options
from stopstorm.metrics.plugin.state import RUN
from stopstorm.simulator.launcher import EmbeddedSimulator

__all__ = ["embedded_simulator", "start_simulator", "stop_simulator"]

_log = logging.getLogger("stopstorm")


def _add_arguments(parser: LocustArgumentParser) -> None:
    group = options.argument_group(parser, "stopstorm embedded simulator", "used when no --host is given")
    group.add_argument("--sim-max-num-seqs", type=int, default=2, env_var="STOPSTORM_SIM_MAX_NUM_SEQS",
                       help="running slots of the embedded simulator, as vLLM's --max-num-seqs (default 2)")
    group.add_argument("--sim-args", default="", env_var="STOPSTORM_SIM_ARGS",
                       help="more flags for the embedded simulator, e.g. \"--step-base-ms 20 --seed 1\" "
                       "(see stopstorm simulator --help)")
    group.add_argument("--sim-log", default="", env_var="STOPSTORM_SIM_LOG",
                       help="file for the embedded simulator's vLLM-like request log (default: a temp file)")


options.register(_add_arguments, rank=50)


def embedded_simulator() -> EmbeddedSimulator | None:
    """The simulator this process started, if any."""
    return RUN.simulator


def start_simulator(environment: Any) -> None:
    """Start the embedded simulator and point the run at it."""
    opts = environment.parsed_options
    args = ["--max-num-seqs", str(getattr(opts, "sim_max_num_seqs", 2)), *shlex.split(getattr(opts, "sim_args", ""))]
    sim = EmbeddedSimulator(args, log_path=getattr(opts, "sim_log", "") or None)
    url = sim.start()
    RUN.simulator = sim
    atexit.register(stop_simulator)
    environment.host = url
    if opts is not None:
        opts.host = url
    _log.info("no --host given: started the embedded simulator at %s (pid %s, %s); its log: %s",
              url, sim.pid, " ".join(args), sim.log_path)


def stop_simulator(**_kwargs: Any) -> None:
    """Stop it by PID (a listener of Locust's quit, registered last, and atexit)."""
    sim, RUN.simulator = RUN.simulator, None
    if sim is not None:
        code = sim.stop()
        _log.info("stopped the embedded simulator (exit status %s); its log: %s", code, sim.log_path)

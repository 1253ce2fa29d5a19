"""Every Locust event hook stopstorm registers, in one module, so the locustfile stays a table of contents.

- Command-line options: the users' (users/options.py), the probe's, and the embedded simulator's.
- The embedded simulator: with no `--host`, the run starts one (in its own process, on a free loopback port),
  points the run at it, and stops it when Locust quits (normal end, Ctrl-C, SIGTERM or an error).
- Bad settings stop the run before any load, with the option named.
- The stop-semantics probe's table, printed after Locust's own summary and saved as JSON.
"""

from __future__ import annotations

import atexit
import logging
import shlex
from typing import Any

from locust import events
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.runners import WorkerRunner

from simulator.launcher import EmbeddedSimulator
from users.options import add_arguments as add_user_arguments
from users.options import settings_for
from users.probe import add_probe_arguments, probe_results, write_probe_results

__all__ = ["embedded_simulator"]

_log = logging.getLogger("stopstorm")
_state: dict[str, EmbeddedSimulator] = {}
_probe_env: dict[str, Environment] = {}


@events.init_command_line_parser.add_listener
def _add_arguments(parser: LocustArgumentParser) -> None:
    add_user_arguments(parser)
    add_probe_arguments(parser)
    group = parser.add_argument_group("stopstorm embedded simulator", "used when no --host is given")
    group.add_argument("--sim-max-num-seqs", type=int, default=2, env_var="STOPSTORM_SIM_MAX_NUM_SEQS",
                       help="running slots of the embedded simulator, as vLLM's --max-num-seqs (default 2)")
    group.add_argument("--sim-args", default="", env_var="STOPSTORM_SIM_ARGS",
                       help="more flags for the embedded simulator, e.g. \"--step-base-ms 20 --seed 1\" "
                       "(see python -m simulator --help)")
    group.add_argument("--sim-log", default="", env_var="STOPSTORM_SIM_LOG",
                       help="file for the embedded simulator's vLLM-like request log (default: a temp file)")


def embedded_simulator() -> EmbeddedSimulator | None:
    """The simulator this process started, if any."""
    return _state.get("sim")


def _stop_simulator(**_kwargs: Any) -> None:
    sim = _state.pop("sim", None)
    if sim is not None:
        code = sim.stop()
        _log.info("stopped the embedded simulator (exit status %s); its log: %s", code, sim.log_path)


@events.init.add_listener
def _start_simulator(environment: Environment, **_kwargs: Any) -> None:
    if environment.host or isinstance(environment.runner, WorkerRunner):
        return
    opts = environment.parsed_options
    args = ["--max-num-seqs", str(getattr(opts, "sim_max_num_seqs", 2)), *shlex.split(getattr(opts, "sim_args", ""))]
    sim = EmbeddedSimulator(args, log_path=getattr(opts, "sim_log", "") or None)
    url = sim.start()
    _state["sim"] = sim
    atexit.register(_stop_simulator)
    environment.host = url
    if opts is not None:
        opts.host = url
    _log.info("no --host given: started the embedded simulator at %s (pid %s, %s); its log: %s",
              url, sim.pid, " ".join(args), sim.log_path)


@events.init.add_listener
def _check_settings(environment: Environment, **_kwargs: Any) -> None:
    """Refuse bad options before any load; workers get theirs checked by the master first."""
    if not environment.host or isinstance(environment.runner, WorkerRunner):
        return
    try:
        settings_for(environment, environment.host)
    except ValueError as exc:
        _log.error("stopstorm: %s", exc)
        _stop_simulator()
        raise SystemExit(2) from None


@events.quit.add_listener
def _print_probe_table(**_kwargs: Any) -> None:
    if not probe_results() or _probe_env.get("env") is None:
        return
    env = _probe_env["env"]
    path = env.parsed_options.probe_json
    table = write_probe_results(path, env.host)
    print(f"\nstopstorm stop-semantics probe (truth: simulator ledger; JSON: {path})\n{table}\n", flush=True)


@events.init.add_listener
def _remember_environment(environment: Environment, **_kwargs: Any) -> None:
    _probe_env["env"] = environment


events.quit.add_listener(_stop_simulator)

"""Load shapes for capacity planning: an open model (Poisson arrivals) and a step load that finds the SLO knee.

Locust's own model is closed: each user waits for its answer, then thinks, so a slow server slows its own
load and queue wait hides. `--arrival-rate R` gives the open model instead: the process's users share one
Poisson arrival clock of rate R per second, and each free user takes the next arrival time and sleeps until
it. Users are then only the concurrency cap; an arrival that finds no free user is served late, and that is
counted and reported (raise -u), never hidden.

`SloStepShape` (in `capacity.py`, a locustfile of its own) raises users by `--step-users` every
`--step-seconds` until the SLO (`--slo queue_wait_p95<2`, or `ttft_p95<…`, seconds) breaks over a step, and
reports the knee: the most users that held it, with the server's `max_num_seqs`, the stop rate and close mix,
as one sentence (the capacity estimate). Queue wait is server truth (the simulator's ledger: arrivals in the
step's second half); TTFT is the clients' own (send → first token), the only truth a real vLLM gives per request.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
from locust.argument_parser import LocustArgumentParser

from stopstorm.metrics.plugin import options
from stopstorm.metrics.plugin.options import MAX_SECONDS, Number, Option, Parsed, seconds
from stopstorm.metrics.plugin.state import RUN

__all__ = ["ArrivalClock", "Slo", "StepResult", "add_shape_arguments", "arrival_clock", "capacity_sentence",
           "open_model_wait", "parse_slo"]

_log = logging.getLogger("stopstorm.shapes")
_SLO = re.compile(r"^\s*(queue_wait|ttft)_p(50|90|95|99)\s*<\s*([0-9.]+)\s*$")


MAX_USERS = 1_000_000
MAX_ARRIVAL_RATE = 1e6  # arrivals per second


def _check_steps(opts: Any) -> None:
    users, most = getattr(opts, "step_users", None), getattr(opts, "step_max_users", None)
    if isinstance(users, int) and isinstance(most, int) and most < users:
        raise ValueError(f"--step-max-users must be at least --step-users ({users}), got {most}")


TABLE = options.OptionTable("stopstorm load shapes", description="open-model arrivals and the SLO step load "
                            "(capacity.py)", options=(
    Option("--arrival-rate", "open model: Poisson arrivals per second for this Locust process, users are only the "
           "concurrency cap (default 0: Locust's closed model with --think-time)", 0.0,
           Number(low=0.0, high=MAX_ARRIVAL_RATE, unit="arrivals/s"), float),
    Option("--slo", "capacity.py's SLO: queue_wait_pNN<S or ttft_pNN<S, seconds (default queue_wait_p95<2)",
           "queue_wait_p95<2", Parsed(lambda text: parse_slo(text), "queue_wait_pNN<S or ttft_pNN<S")),
    Option("--step-users", "capacity.py: users added each step (default 2)", 2,
           Number(low=1, high=MAX_USERS, integer=True), int),
    Option("--step-seconds", "capacity.py: seconds per step; the SLO is judged over its second half (default 20)",
           20.0, seconds(above=True), float),
    Option("--step-max-users", "capacity.py: stop raising here even if the SLO still holds (default 64)", 64,
           Number(low=1, high=MAX_USERS, integer=True), int),
))


def add_shape_arguments(parser: LocustArgumentParser) -> None:
    TABLE.add_arguments(parser)


options.register(TABLE, _check_steps, rank=30)


# --- the open model ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ArrivalClock:
    """One Poisson arrival sequence shared by a process's users; each free user claims the next arrival."""

    rate: float
    rng: random.Random = field(default_factory=random.Random)
    next_at: float = field(default_factory=time.monotonic)
    arrivals: int = 0
    late: int = 0  # arrivals that found no free user and went out late
    late_s: float = 0.0

    def claim(self, now: float, tolerance_s: float = 0.01) -> float:
        """Seconds to wait before the next arrival (0 if it is already due; counted late beyond tolerance)."""
        at = self.next_at
        self.next_at += self.rng.expovariate(self.rate)
        self.arrivals += 1
        if at < now - tolerance_s:
            self.late += 1
            self.late_s += now - at
        return max(0.0, at - now)


_clock: dict[str, ArrivalClock] = {}


def arrival_clock(environment: Any) -> ArrivalClock | None:
    """The process's arrival clock when `--arrival-rate` is set, else None (closed model)."""
    opts = getattr(environment, "parsed_options", None)
    rate = float(getattr(opts, "arrival_rate", 0.0) or 0.0)
    if rate <= 0:
        return None
    clock = _clock.get("clock")
    if clock is None or clock.rate != rate:
        clock = _clock["clock"] = ArrivalClock(rate)
        RUN.arrivals = clock  # the report says whether the arrivals went out on time
    return clock


def open_model_wait(environment: Any) -> bool:
    """In the open model, sleep until this user's next arrival and return True; in the closed model False."""
    clock = arrival_clock(environment)
    if clock is None:
        return False
    delay = clock.claim(time.monotonic())
    if delay > 0:
        gevent.sleep(delay)
    return True


# --- the SLO and the knee ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Slo:
    metric: str  # queue_wait or ttft
    quantile: float
    limit_s: float

    def __str__(self) -> str:
        return f"{self.metric} p{round(self.quantile * 100)} < {self.limit_s:g} s"


def parse_slo(text: str) -> Slo:
    m = _SLO.match(text)
    limit = _number(m.group(3)) if m else None
    if not m or limit is None or not 0 < limit <= MAX_SECONDS:
        raise ValueError(f"--slo: expected queue_wait_pNN<S or ttft_pNN<S (NN one of 50, 90, 95, 99; S seconds > 0), "
                         f"got {text!r}")
    return Slo(m.group(1), int(m.group(2)) / 100, limit)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class StepResult:
    users: int
    samples: int
    value_s: float | None  # the SLO quantile over the step's judged window; None without samples
    held: bool


def capacity_sentence(knee: int | None, steps: list[StepResult], slo: Slo, max_num_seqs: int | None,
                      stop_probability: float, close_mix: str) -> str:
    """The capacity estimate, in one sentence."""
    k = "?" if max_num_seqs is None else str(max_num_seqs)
    where = f"At max_num_seqs {k}, stop rate {stop_probability:g} and close mix {close_mix}"
    if knee is None:
        first = steps[0].users if steps else 0
        return f"{where}, this server held no tested load within the SLO ({slo}): it broke at {first} users."
    broke = next((s for s in steps if not s.held), None)
    tail = (f"; it broke at {broke.users} users ({slo.metric} p{round(slo.quantile * 100)} "
            f"{broke.value_s:.3f} s)" if broke is not None and broke.value_s is not None else
            "; the SLO never broke up to --step-max-users")
    return f"{where}, this server holds {knee} users within the SLO ({slo}){tail}."

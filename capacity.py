"""stopstorm capacity search: raise users step by step until the SLO breaks, and say how many the server holds.

    locust -f capacity.py --headless --slo queue_wait_p95<2 --step-users 2 --step-seconds 20

Every stack user of locustfile.py takes part (name classes to pick some), against the embedded simulator when
no --host is given. Each step runs `--step-seconds` at `--step-users` more users than the last; the SLO is
judged over the step's second half (the first half lets the queue settle). At the first step that breaks it,
or at `--step-max-users`, the run ends and prints the capacity estimate; the steps go to JSON
(`--capacity-json`, default stopstorm-capacity.json), and the run's own report and HTML are written as usual.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from locust import LoadTestShape, events
from locust.argument_parser import LocustArgumentParser

from stopstorm.locustfile import (
    FastHttpStreamUser,
    HttpxAsyncUser,
    HttpxUser,
    OpenAIAsyncUser,
    OpenAIUser,
    RequestsUser,
)
from stopstorm.metrics.figures import distribution
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.truth.ledger import LedgerClient, server_max_num_seqs
from stopstorm.users.shapes import Slo, StepResult, capacity_sentence, parse_slo

__all__ = ["FastHttpStreamUser", "HttpxAsyncUser", "HttpxUser", "OpenAIAsyncUser", "OpenAIUser", "RequestsUser",
           "SloStepShape"]

_log = logging.getLogger("stopstorm.capacity")
_ttft: list[tuple[float, float]] = []  # (sent, ttft) of every stream that got a first token
_env: dict[str, Any] = {}


@events.init.add_listener
def _keep_env(environment: Any, **_kwargs: Any) -> None:
    _env["env"] = environment


@events.init_command_line_parser.add_listener
def _add_arguments(parser: LocustArgumentParser) -> None:
    parser.add_argument("--capacity-json", default="stopstorm-capacity.json", env_var="STOPSTORM_CAPACITY_JSON",
                        help="capacity.py: where to write the steps and the knee (default stopstorm-capacity.json)")


@events.request.add_listener
def _keep_ttft(context: dict[str, Any] | None = None, **_kwargs: Any) -> None:
    record = (context or {}).get("record")
    if isinstance(record, StreamRecord) and record.ttft is not None:
        _ttft.append((record.sent, record.ttft))


def _quantile(values: list[float], q: float) -> float | None:
    d = distribution(values)
    if d is None:
        return None
    return {0.5: d.p50, 0.9: d.p90, 0.95: d.p95, 0.99: d.p99}[q]


class SloStepShape(LoadTestShape):
    """Users += --step-users every --step-seconds while the SLO holds; the knee is the last step that held it."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[StepResult] = []
        self.knee: int | None = None
        self.done = False
        self._slo: Slo | None = None
        self._started: float | None = None
        self.max_num_seqs: int | None = None

    def _opts(self) -> Any:
        return self.runner.environment.parsed_options  # type: ignore[union-attr]

    def _judge(self, users: int, start: float, end: float) -> StepResult:
        slo = self._slo
        assert slo is not None
        if slo.metric == "ttft":
            values = [t for sent, t in _ttft if start <= sent < end]
        else:
            client = LedgerClient(self.runner.environment.host or "")  # type: ignore[union-attr]
            try:
                ledger = client.ledger()
            finally:
                client.close()
            if ledger is None:
                raise SystemExit("--slo queue_wait_… needs the simulator's ledger; against real vLLM use ttft_pNN")
            # A request still waiting has waited at least until now: counted so, or a growing queue would hide.
            values = [e.queue_wait if e.queue_wait is not None else ledger.now - e.arrival
                      for e in ledger.entries if start <= e.arrival < end]
        value = _quantile(values, slo.quantile)
        return StepResult(users, len(values), value, value is not None and value < slo.limit_s)

    def tick(self) -> tuple[int, float] | None:
        if self.done:
            return None
        opts = self._opts()
        if self._slo is None:
            try:
                self._slo = parse_slo(opts.slo)
            except ValueError as exc:
                _log.error("stopstorm: %s", exc)
                self.done = True
                return None
            self._started = time.monotonic()
            self.max_num_seqs = server_max_num_seqs(self.runner.environment.host or "")  # type: ignore[union-attr]
        step_s, per_step = float(opts.step_seconds), int(opts.step_users)
        assert self._started is not None
        elapsed = time.monotonic() - self._started
        k = int(elapsed // step_s)
        if k > len(self.steps) and k >= 1:  # step k-1 has just ended: judge its second half
            users = per_step * k
            end = self._started + k * step_s
            result = self._judge(users, end - step_s / 2, end)
            self.steps.append(result)
            _log.info("stopstorm capacity: %d users → %s %s over %d requests: %s", users, self._slo,
                      "–" if result.value_s is None else f"{result.value_s:.3f} s", result.samples,
                      "held" if result.held else "BROKEN")
            if result.held:
                self.knee = users
            if not result.held or users + per_step > int(opts.step_max_users):
                self.done = True
                return None
        return per_step * (k + 1), float(max(per_step, 1))


@events.quit.add_listener
def _print_capacity(**_kwargs: Any) -> None:
    env = _env.get("env")
    shape = getattr(env, "shape_class", None) if env is not None else None
    if not isinstance(shape, SloStepShape) or shape._slo is None:
        return
    opts = env.parsed_options  # type: ignore[union-attr]
    sentence = capacity_sentence(shape.knee, shape.steps, shape._slo, shape.max_num_seqs,
                                 float(opts.stop_probability), opts.close_mix)
    doc = {"slo": str(shape._slo), "knee_users": shape.knee, "max_num_seqs": shape.max_num_seqs,
           "stop_probability": float(opts.stop_probability), "close_mix": opts.close_mix, "estimate": sentence,
           "steps": [{"users": s.users, "samples": s.samples, "value_s": s.value_s, "held": s.held}
                     for s in shape.steps]}
    with open(opts.capacity_json, "wb") as fh:
        fh.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    rows = "\n".join(f"  {s.users:>5} users  {s.samples:>6} requests  "
                     f"{'–' if s.value_s is None else f'{s.value_s:8.3f} s'}  {'held' if s.held else 'BROKEN'}"
                     for s in shape.steps)
    print(f"\nstopstorm capacity ({shape._slo}; JSON: {opts.capacity_json})\n{rows}\n{sentence}\n", flush=True)

"""stopstorm capacity search: raise users step by step until the SLO breaks, and say how many the server holds.

    locust -f capacity.py --headless --slo queue_wait_p95<2 --step-users 2 --step-seconds 20

Every stack user of locustfile.py takes part (name classes to pick some), against the embedded simulator when
no --host is given. Each step runs `--step-seconds` at `--step-users` more users than the last; the SLO is
judged over the step's second half (the first half lets the queue settle), with a 95 % bootstrap interval,
and turned into what a planner sizes with: requests per second arriving and output tokens per second
generated in that window (the simulator's ledger; against real vLLM with a ttft SLO, the clients' records).
A step judged on fewer requests than its quantile needs (5 beyond it: p95 needs 100) is flagged and warned
about. At the first step that breaks the SLO, or at `--step-max-users`, the run ends and prints the capacity
estimate; the steps go to JSON (`--capacity-json`, default stopstorm-capacity.json) and into the run's own
report (its `capacity_search`: the HTML page's capacity section and step markers), written as usual.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from locust import LoadTestShape, events

from stopstorm.locustfile import (
    FastHttpStreamUser,
    HttpxAsyncUser,
    HttpxUser,
    OpenAIAsyncUser,
    OpenAIUser,
    RequestsUser,
)
from stopstorm.metrics.analysis.verdict import CapacitySearch, SearchStep, bootstrap_interval, few_requests
from stopstorm.metrics.figures import CLIENT_SOURCE, LEDGER_SOURCE, distribution
from stopstorm.metrics.plugin import options
from stopstorm.metrics.plugin.hooks import ledger_so_far
from stopstorm.metrics.plugin.state import RUN
from stopstorm.metrics.truth.ledger import LedgerSnapshot, server_max_num_seqs
from stopstorm.users.shapes import Slo, StepResult, capacity_sentence, parse_slo

__all__ = ["FastHttpStreamUser", "HttpxAsyncUser", "HttpxUser", "OpenAIAsyncUser", "OpenAIUser", "RequestsUser",
           "SloStepShape"]

_log = logging.getLogger("stopstorm.capacity")
# The streams are the run's own records (RUN.records: on a master, every worker's too, as they arrive), so a TTFT
# SLO is judged on the same streams in master/worker mode as in one process.


TABLE = options.OptionTable("stopstorm capacity search", options=(
    options.Option("--capacity-json", "capacity.py: where to write the steps and the knee (default "
                   "stopstorm-capacity.json)", "stopstorm-capacity.json", options.WritablePath(),
                   env="STOPSTORM_CAPACITY_JSON", master_only=True),
))
options.register(TABLE, rank=35)  # checked with every option, before load: not found only after the whole search


def _quantile(values: list[float], q: float) -> float | None:
    d = distribution(values)
    if d is None:
        return None
    return {0.5: d.p50, 0.9: d.p90, 0.95: d.p95, 0.99: d.p99}[q]


def _ledger_tokens(ledger: LedgerSnapshot, start: float, end: float) -> float:
    """Tokens the server generated within [start, end): each request's spread evenly from first to last token."""
    total = 0.0
    for e in ledger.served:
        first, n = e.first_token, e.generated_tokens
        if first is None or not n:
            continue
        last = e.last_token if e.last_token is not None else first
        if last <= first:
            total += n if start <= first < end else 0
            continue
        overlap = min(last, end) - max(first, start)
        if overlap > 0:
            total += n * overlap / (last - first)
    return total


def _client_window(start: float, end: float) -> tuple[list[float], int, int]:
    """The streams' view of [start, end), in one pass over the run's records (read back from disk): the TTFTs
    and count of those sent in it, and the tokens the clients read in it (from each stream's chunk marks)."""
    ttfts: list[float] = []
    sent = tokens_read = 0
    for r in RUN.records:
        if start <= r.sent < end:
            sent += 1
            if r.ttft is not None:
                ttfts.append(r.ttft)
        last = 0
        for t, tokens in zip(r.chunk_times, r.chunk_tokens, strict=False):
            if start <= t < end:
                tokens_read += tokens - last
            last = tokens
    return ttfts, sent, tokens_read


class SloStepShape(LoadTestShape):
    """Users += --step-users every --step-seconds while the SLO holds; the knee is the last step that held it."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[StepResult] = []
        self.search_steps: list[SearchStep] = []
        self.knee: int | None = None
        self.done = False
        self._slo: Slo | None = None
        self._started: float | None = None
        self.max_num_seqs: int | None = None

    def _opts(self) -> Any:
        return self.runner.environment.parsed_options  # type: ignore[union-attr]

    def _judge(self, users: int, start: float, end: float) -> SearchStep:
        slo = self._slo
        assert slo is not None
        window = end - start
        if slo.metric == "ttft":
            values, sent, read = _client_window(start, end)
            rate, tokens, source = sent / window, read / window, CLIENT_SOURCE
        else:
            ledger = ledger_so_far(self.runner.environment.host or "")  # type: ignore[union-attr]
            if ledger is None:
                raise SystemExit("--slo queue_wait_… needs the simulator's ledger; against real vLLM use ttft_pNN")
            # A request still waiting has waited at least until now: counted so, or a growing queue would hide.
            values = [e.queue_wait if e.queue_wait is not None else ledger.now - e.arrival
                      for e in ledger.entries if start <= e.arrival < end]
            rate, tokens, source = len(values) / window, _ledger_tokens(ledger, start, end) / window, LEDGER_SOURCE
        value = _quantile(values, slo.quantile)
        assert self._started is not None
        return SearchStep(users, len(values), value, value is not None and value < slo.limit_s,
                          bootstrap_interval(values, slo.quantile), round(rate, 4), round(tokens, 2), source,
                          round(end - self._started, 3))

    def search(self) -> CapacitySearch | None:
        """The search so far, as the report carries it."""
        slo = self._slo
        if slo is None:
            return None
        opts = self._opts()
        sentence = capacity_sentence(self.knee, self.steps, slo, self.max_num_seqs, float(opts.stop_probability),
                                     opts.close_mix)
        return CapacitySearch(str(slo), slo.quantile, tuple(self.search_steps), self.knee, sentence)

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
            judged = self._judge(users, end - step_s / 2, end)
            result = StepResult(users, judged.requests, judged.value_s, judged.held)
            self.steps.append(result)
            self.search_steps.append(judged)
            _log.info("stopstorm capacity: %d users → %s %s over %d requests (%s req/s, %s output tok/s): %s",
                      users, self._slo, "–" if result.value_s is None else f"{result.value_s:.3f} s", result.samples,
                      judged.request_rate, judged.output_rate, "held" if result.held else "BROKEN")
            need = few_requests(self._slo.quantile)
            if judged.requests < need:
                _log.warning("stopstorm capacity: the step at %d users was judged on %d requests, fewer than the %d "
                             "its p%d needs (5 beyond it): lengthen --step-seconds", users, judged.requests, need,
                             round(self._slo.quantile * 100))
            if result.held:
                self.knee = users
            RUN.capacity_search = self.search()  # the run's report carries it (written at quit, before our print)
            if not result.held or users + per_step > int(opts.step_max_users):
                self.done = True
                return None
        return per_step * (k + 1), float(max(per_step, 1))


@events.quit.add_listener
def _print_capacity(**_kwargs: Any) -> None:
    env = RUN.environment
    shape = getattr(env, "shape_class", None) if env is not None else None
    if not isinstance(shape, SloStepShape) or shape._slo is None:
        return
    opts = env.parsed_options
    search = shape.search()
    assert search is not None
    knee = search.knee
    doc = {"slo": str(shape._slo), "knee_users": shape.knee, "max_num_seqs": shape.max_num_seqs,
           "stop_probability": float(opts.stop_probability), "close_mix": opts.close_mix,
           "estimate": search.estimate, "min_requests": search.min_requests,
           "knee_request_rate": knee.request_rate if knee is not None else None,
           "knee_output_rate": knee.output_rate if knee is not None else None,
           "steps": [{"users": s.users, "samples": s.requests, "value_s": s.value_s, "held": s.held,
                      "interval_s": None if s.interval_s is None else list(s.interval_s),
                      "request_rate": s.request_rate, "output_rate": s.output_rate, "rate_source": s.rate_source,
                      "few_requests": s.requests < search.min_requests}
                     for s in search.steps]}
    with open(opts.capacity_json, "wb") as fh:
        fh.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))

    def interval(s: SearchStep) -> str:
        return f"[{s.interval_s[0]:.3f}, {s.interval_s[1]:.3f}]" if s.interval_s else "[–]"

    def few(s: SearchStep) -> str:
        return "*" if s.requests < search.min_requests else " "

    rows = "\n".join(f"  {s.users:>5} users  {s.requests:>6} requests{few(s)} "
                     f"{'–' if s.value_s is None else f'{s.value_s:8.3f} s'} {interval(s):>18}  "
                     f"{s.request_rate or 0:7.2f} req/s  {s.output_rate or 0:8.1f} tok/s  "
                     f"{'held' if s.held else 'BROKEN'}" for s in search.steps)
    lines = [f"\nstopstorm capacity ({shape._slo}; JSON: {opts.capacity_json})", rows, search.estimate]
    if knee is not None and knee.request_rate is not None and knee.output_rate is not None:
        lines.append(f"At the knee ({knee.users} users): {knee.request_rate:,.2f} requests/s arriving, "
                     f"{knee.output_rate:,.1f} output tokens/s generated [{knee.rate_source}].")
    thin = search.thin_steps()
    if thin:
        lines.append(f"* judged on fewer than {search.min_requests} requests (5 beyond its quantile): "
                     f"{len(thin)} of {len(search.steps)} steps; lengthen --step-seconds for a firmer knee.")
    print("\n".join(lines) + "\n", flush=True)

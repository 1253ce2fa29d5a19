"""The answer at the top of every view: a verdict a capacity planner can paste, and one fixed summary block.

A run's figures are many (per stack × close mode, per truth source); a planner first wants three things in
words: which stacks and close modes honoured Stop within one engine step, how much capacity zombies held, and
what early aborts saved. `verdict` says them, each with its source, from the run's own figures (the accounting,
the capacity section and its replay, the self-monitor's counts): it computes no new truth, it reads and words
it. `run_summary` is the block under it that a vLLM `bench serve` user expects, in one fixed order: requests
and req/s, output and delivered tokens/s, TTFT/TPOT/ITL p50/p99 (the clients' own timings), queue wait, and
the server's decode step the verdict judges against. `bootstrap_interval` / `bootstrap_difference` give the
noise of a quantile from its per-request samples (comparisons and capacity steps use them), and
`CapacitySearch` is what `capacity.py`'s step search found, as the report carries it.

Pure functions; the console, the HTML page, the web UI and comparisons only show what these return.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from stopstorm.metrics.analysis.accounting import NOT_STOPPED, Accounting, Cell, Figures
from stopstorm.metrics.analysis.capacity import CapacitySection
from stopstorm.metrics.figures import (
    CLIENT_SOURCE,
    LEDGER_SOURCE,
    METRICS_SOURCE,
    Distribution,
    Figure,
    distribution,
    unknown,
)
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.truth.ledger import LedgerSnapshot
from stopstorm.metrics.truth.vllm_metrics import MetricsDelta

__all__ = [
    "CapacitySearch",
    "CellVerdict",
    "SearchStep",
    "Summary",
    "Verdict",
    "bootstrap_difference",
    "bootstrap_interval",
    "few_requests",
    "run_summary",
    "step_bound",
    "verdict",
]

# --- the summary block -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Summary:
    """The fixed block under the verdict, in the order every view shows it."""

    requests: Figure  # streams the clients sent (every one reported, stopped, failed or cut by the run's end)
    completed: Figure  # of which read to their end by a user who never pressed Stop
    request_rate: Figure  # requests / run duration
    output_rate: Figure  # tokens the server generated per second
    goodput_rate: Figure  # tokens delivered to users still reading, per second (the accounting's)
    ttft: Figure  # request written (or sent) → first token, as the clients saw it (Distribution, s)
    tpot: Figure  # per request: (last token − first token) / (tokens − 1), the clients' (Distribution, s)
    itl: Figure  # every gap between token chunks a client read (Distribution, s)
    queue_wait: Figure  # arrival → scheduled (the accounting's run figure)
    step: Figure  # the server's decode step: the median of its requests' mean inter-token times
    stacks: tuple[str, ...] = ()  # the client stacks that sent streams, sorted
    planned_stacks: tuple[str, ...] = ()  # the stacks the run's user classes name (empty: not known)
    ttft_samples_s: tuple[float, ...] = ()  # every TTFT of `ttft`, sorted (the HTML's CDF, comparisons' noise)

    def items(self) -> list[tuple[str, Figure]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if isinstance(getattr(self, f.name), Figure)]

    def to_json(self) -> dict[str, Any]:
        return {"figures": {name: f.to_json() for name, f in self.items()}, "stacks": list(self.stacks),
                "planned_stacks": list(self.planned_stacks), "ttft_samples_s": list(self.ttft_samples_s)}

    @classmethod
    def from_json(cls, doc: Any) -> Summary:
        d = doc if isinstance(doc, Mapping) else {}
        figs = d.get("figures") or {}
        units = {"requests": "streams", "completed": "streams", "request_rate": "requests/s",
                 "output_rate": "tokens/s", "goodput_rate": "tokens/s"}
        return cls(**{f.name: Figure.from_json(figs.get(f.name), units.get(f.name, "s"))
                      for f in fields(cls) if f.name not in _LISTS},
                   stacks=tuple(d.get("stacks") or ()), planned_stacks=tuple(d.get("planned_stacks") or ()),
                   ttft_samples_s=tuple(d.get("ttft_samples_s") or ()))


_LISTS = ("stacks", "planned_stacks", "ttft_samples_s")


def _tpot(r: StreamRecord) -> float | None:
    times, tokens = r.chunk_times, r.chunk_tokens
    if len(times) < 2 or not tokens or tokens[-1] - tokens[0] < 1:
        return None
    return (times[-1] - times[0]) / (tokens[-1] - tokens[0])


def _server_itl(entries: Iterable[Any]) -> list[float]:
    out = []
    for e in entries:
        n, first, last = e.generated_tokens, e.first_token, e.last_token
        if n >= 2 and first is not None and last is not None and last > first:
            out.append((last - first) / (n - 1))
    return out


def run_summary(records: Sequence[StreamRecord], accounting: Accounting, capacity: CapacitySection | None,
                ledger: LedgerSnapshot | None, metrics: MetricsDelta | None, duration_s: float,
                planned_stacks: Sequence[str] = ()) -> Summary:
    """The summary block of one run, from its records, its accounting and what the server said."""
    o = accounting.overall
    n = len(records)
    done = sum(1 for r in records if r.stop is None and r.error is None)
    rate = Figure(n / duration_s, "requests/s", CLIENT_SOURCE, "streams sent / run duration") if duration_s > 0 \
        else unknown("requests/s")
    if capacity is not None and capacity.throughput.known:
        output = Figure(capacity.throughput.value, "tokens/s", capacity.throughput.source, "tokens the server "
                        "generated / run duration")
    elif metrics is not None and metrics.total.generation_tokens is not None and duration_s > 0:
        output = Figure(metrics.total.generation_tokens / duration_s, "tokens/s", METRICS_SOURCE,
                        "Δ generation_tokens_total / run duration")
    else:
        output = unknown("tokens/s")

    def dist(values: Iterable[float], note: str) -> Figure:
        d = distribution(values)
        return Figure(d, "s", CLIENT_SOURCE, note) if d is not None else unknown("s", note)

    step = distribution(_server_itl(ledger.served)) if ledger is not None else None
    ttfts = sorted(round(t, 6) for r in records if (t := r.ttft) is not None)
    return Summary(
        requests=Figure(n, "streams", CLIENT_SOURCE, "every stream the clients sent"),
        completed=Figure(done, "streams", CLIENT_SOURCE, "read to their end, nobody pressed Stop"),
        request_rate=rate,
        output_rate=output,
        goodput_rate=o.goodput_rate,
        ttft=dist(ttfts, "request written (where stamped, else sent) → first token"),
        tpot=dist((t for r in records if (t := _tpot(r)) is not None),
                  "per stream: first → last token / (tokens − 1)"),
        itl=dist((g for r in records for g in r.itl), "gaps between the token chunks a client read"),
        queue_wait=o.queue_wait,
        step=(Figure(step.p50, "s", LEDGER_SOURCE, "median of the requests' mean inter-token time")
              if step is not None else unknown("s", "needs per-request server truth")),
        stacks=tuple(sorted({r.stack for r in records})),
        planned_stacks=tuple(sorted(set(planned_stacks))),
        ttft_samples_s=tuple(ttfts),
    )


# --- the capacity search (capacity.py) ---------------------------------------------------------------------------


def few_requests(quantile: float) -> int:
    """The fewest requests a step's quantile is judged on before it rests on too few: 5 beyond the quantile
    (p50: 10, p90: 50, p95: 100, p99: 500)."""
    return math.ceil(5 / max(1e-9, 1 - quantile) - 1e-9)


@dataclass(frozen=True, slots=True)
class SearchStep:
    """One step of capacity.py's search, judged over its second half."""

    users: int
    requests: int  # the requests the SLO was judged on
    value_s: float | None  # the SLO's quantile over them
    held: bool
    interval_s: tuple[float, float] | None = None  # the quantile's 95 % bootstrap interval
    request_rate: float | None = None  # requests per second arriving in the judged window
    output_rate: float | None = None  # tokens per second generated (or, without a ledger, read) in it
    rate_source: str = LEDGER_SOURCE
    end_s: float | None = None  # when the step ended, seconds since the search (and the run) started

    def to_json(self) -> dict[str, Any]:
        return {"users": self.users, "requests": self.requests, "value_s": self.value_s, "held": self.held,
                "interval_s": None if self.interval_s is None else list(self.interval_s),
                "request_rate": self.request_rate, "output_rate": self.output_rate, "rate_source": self.rate_source,
                "end_s": self.end_s}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SearchStep:
        iv = d.get("interval_s")
        return cls(int(d.get("users") or 0), int(d.get("requests") or 0), d.get("value_s"), bool(d.get("held")),
                   (float(iv[0]), float(iv[1])) if isinstance(iv, Sequence) and len(iv) == 2 else None,
                   d.get("request_rate"), d.get("output_rate"), str(d.get("rate_source") or LEDGER_SOURCE),
                   d.get("end_s"))


@dataclass(frozen=True, slots=True)
class CapacitySearch:
    """What capacity.py's step search found: its steps, the knee (the last step that held the SLO), and the
    estimate in words."""

    slo: str
    quantile: float
    steps: tuple[SearchStep, ...]
    knee_users: int | None
    estimate: str = ""

    @property
    def knee(self) -> SearchStep | None:
        return next((s for s in self.steps if s.users == self.knee_users), None)

    @property
    def min_requests(self) -> int:
        return few_requests(self.quantile)

    def thin_steps(self) -> list[SearchStep]:
        """Steps judged on fewer requests than their quantile needs (`few_requests`)."""
        return [s for s in self.steps if s.requests < self.min_requests]

    def to_json(self) -> dict[str, Any]:
        return {"slo": self.slo, "quantile": self.quantile, "knee_users": self.knee_users,
                "estimate": self.estimate, "min_requests": self.min_requests,
                "steps": [s.to_json() for s in self.steps]}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> CapacitySearch:
        return cls(str(doc.get("slo", "")), float(doc.get("quantile") or 0.95),
                   tuple(SearchStep.from_json(s) for s in doc.get("steps") or () if isinstance(s, Mapping)),
                   doc.get("knee_users"), str(doc.get("estimate") or ""))


# --- noise -------------------------------------------------------------------------------------------------------


def _boot_quantiles(samples: Sequence[float], q: float, n_boot: int, seed: int) -> Any:
    import numpy as np

    x = np.asarray(samples, dtype=float)
    rng = np.random.default_rng(seed)
    n = len(x)
    out = np.empty(n_boot)
    chunk = max(1, 2_000_000 // max(n, 1))  # resample in slices: at most ~2M indices at a time
    for lo in range(0, n_boot, chunk):
        k = min(chunk, n_boot - lo)
        out[lo:lo + k] = np.quantile(x[rng.integers(0, n, size=(k, n))], q, axis=1)
    return out


def _boot_size(n: int) -> int:
    return 1000 if n <= 5000 else 300


def bootstrap_interval(samples: Sequence[float], q: float, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float] | None:
    """The `level` percentile-bootstrap interval of the `q` quantile of `samples` (seeded: the same samples
    give the same interval); None under 2 samples."""
    if len(samples) < 2:
        return None
    import numpy as np

    boots = _boot_quantiles(samples, q, _boot_size(len(samples)), seed)
    a = (1 - level) / 2
    return float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))


def bootstrap_difference(a: Sequence[float], b: Sequence[float], q: float, level: float = 0.95,
                         seed: int = 0) -> tuple[float, float] | None:
    """The `level` bootstrap interval of quantile_q(b) − quantile_q(a), each sample resampled on its own."""
    if len(a) < 2 or len(b) < 2:
        return None
    import numpy as np

    size = _boot_size(max(len(a), len(b)))
    d = _boot_quantiles(b, q, size, seed + 1) - _boot_quantiles(a, q, size, seed)
    lo = (1 - level) / 2
    return float(np.quantile(d, lo)), float(np.quantile(d, 1 - lo))


# --- the verdict -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CellVerdict:
    """How one stack × close mode answered its users' Stops."""

    stack: str
    close_mode: str
    outcome: str  # "honoured", "late", "never", "unknown"
    stopped: int
    aborted: int | None
    zombies: int | None
    p99_s: float | None  # Stop → slot freed (or abort logged), p99 of the aborted

    def words(self) -> str:
        return f"{self.stack} {self.close_mode}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """Two to five sentences a planner can paste, and what they were decided on."""

    sentences: tuple[str, ...]
    step_bound_s: float | None  # what "within one engine step" meant in this run
    cells: tuple[CellVerdict, ...]
    zombie_share: float | None  # zombie slot-seconds / (duration × max_num_seqs)
    caveats: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"sentences": list(self.sentences), "step_bound_s": self.step_bound_s,
                "zombie_share": self.zombie_share, "caveats": list(self.caveats),
                "cells": [{"stack": c.stack, "close_mode": c.close_mode, "outcome": c.outcome,
                           "stopped": c.stopped, "aborted": c.aborted, "zombies": c.zombies, "p99_s": c.p99_s}
                          for c in self.cells]}

    @classmethod
    def from_json(cls, doc: Any) -> Verdict:
        d = doc if isinstance(doc, Mapping) else {}
        return cls(tuple(d.get("sentences") or ()), d.get("step_bound_s"),
                   tuple(CellVerdict(str(c.get("stack")), str(c.get("close_mode")), str(c.get("outcome")),
                                     int(c.get("stopped") or 0), c.get("aborted"), c.get("zombies"), c.get("p99_s"))
                         for c in d.get("cells") or () if isinstance(c, Mapping)),
                   d.get("zombie_share"), tuple(d.get("caveats") or ()))


def step_bound(step_s: float | None, grace_s: float) -> float:
    """What "within one engine step" allows: the step Stop landed in ends, then the slot is freed at its
    boundary, plus the close's own notice (about a millisecond): 1.5 steps, at least the step + 5 ms. Without a
    known step, the zombie grace."""
    if step_s is None or step_s <= 0:
        return grace_s
    return max(1.5 * step_s, step_s + 0.005)


def _int(f: Figure) -> int | None:
    return int(f.value) if isinstance(f.value, int | float) else None


def _cell_verdict(c: Cell, bound: float) -> CellVerdict:
    f = c.figures
    stopped = _int(f.stopped) or 0
    aborted, zombies = _int(f.aborted), _int(f.zombies)
    lat = f.abort_latency.value
    p99 = lat.p99 if isinstance(lat, Distribution) else None
    if aborted is None:
        outcome = "unknown"
    elif zombies is not None:  # per-request server truth: a zombie is a stopped stream still holding its slot
        if aborted == 0 and zombies > 0:
            outcome = "never"
        elif zombies == 0 and (p99 is None or p99 <= bound):
            outcome = "honoured"
        else:
            outcome = "late"
    elif aborted == 0:
        outcome = "never"
    else:
        outcome = "honoured" if aborted == stopped and p99 is not None and p99 <= bound else "late"
    return CellVerdict(c.stack, c.close_mode, outcome, stopped, aborted, zombies, p99)


def _ms(s: float) -> str:
    return f"{s * 1e3:,.0f} ms" if s >= 0.01 else f"{s * 1e3:.1f} ms"


def _s(s: float) -> str:
    return f"{s:,.2f} s"


def _names(cells: Sequence[CellVerdict], all_cells: Sequence[CellVerdict]) -> str:
    """'close on every stack (4)' where every stack that used a mode is in `cells`; else 'stack mode, …'."""
    out: list[str] = []
    by_mode: dict[str, list[CellVerdict]] = {}
    for c in cells:
        by_mode.setdefault(c.close_mode, []).append(c)
    for mode, mine in by_mode.items():
        used = [c for c in all_cells if c.close_mode == mode]
        if len(mine) == len(used) and len(mine) > 1:
            out.append(f"{mode} on {'both' if len(mine) == 2 else f'all {len(mine)}'} stacks that used it")
        else:
            out += [c.words() for c in mine]
    return ", ".join(out)


def _stop_sentence(cells: Sequence[CellVerdict], bound: float, step_known: bool, source: str) -> str:
    if not cells:
        return "Nobody pressed Stop in this run, so no close mode was tried."
    step = f"within one engine step (≤ {_ms(bound)} Stop → slot freed)" if step_known else \
        f"within {_ms(bound)} of Stop"
    parts = []
    honoured = [c for c in cells if c.outcome == "honoured"]
    late = [c for c in cells if c.outcome == "late"]
    never = [c for c in cells if c.outcome == "never"]
    unknown_ = [c for c in cells if c.outcome == "unknown"]
    if honoured:
        parts.append(f"Stop freed the server's slot {step} for {_names(honoured, cells)}")
    else:
        parts.append(f"No stack × close mode freed the server's slot {step}")
    if late:
        parts.append("late for " + ", ".join(
            f"{c.words()} (p99 {_ms(c.p99_s)})" if c.p99_s is not None else c.words() for c in late))
    if never:
        parts.append(f"never for {_names(never, cells)} (those streams ran on to their end)")
    if unknown_:
        parts.append(f"unknown for {_names(unknown_, cells)} (no per-request server truth)")
    return "; ".join(parts) + f" [{source}]."


def _zombie_sentence(accounting: Accounting, capacity: CapacitySection | None,
                     duration: float | None) -> tuple[str | None, float | None]:
    o = accounting.overall
    z, held = _int(o.zombies), o.zombie_slot_seconds.value
    if z is None or not isinstance(held, int | float):
        return None, None
    if z == 0:
        return (f"No zombies: every stopped stream left its slot within {accounting.zombie_grace_s:g} s of Stop "
                f"[{o.zombies.source}]."), 0.0
    seqs = capacity.max_num_seqs if capacity is not None else None
    share = held / (duration * seqs) if seqs and duration else None
    text = (f"{z} zombie{'s' if z != 1 else ''} (stopped streams still generating) held {held:,.2f} slot-s after "
            f"their users' Stop")
    if share is not None and duration is not None and seqs:
        text += (f": {share * 100:.0f} % of the run's {duration * seqs:,.1f} slot-s ({duration:,.1f} s × "
                 f"max_num_seqs {seqs})")
    return text + f" [{o.zombies.source}].", share


def _freed_words(accounting: Accounting) -> str | None:
    o, run = accounting.overall, accounting.run
    if not isinstance(o.freed_tokens.value, int):
        return None
    slot, rate = o.freed_slot_seconds.value, run.freed_tokens_rate.value
    extra = [f"{slot:,.2f} slot-s" if isinstance(slot, int | float) else "",
             f"{rate:,.1f} tok/s of decode throughput" if isinstance(rate, int | float) else ""]
    inner = ", ".join(e for e in extra if e)
    return (f"spared the engine {o.freed_tokens.value:,} tokens" + (f" ({inner})" if inner else "")
            + f" against every stopped stream run to its end [{o.freed_tokens.source}]")


def _saved_sentence(accounting: Accounting, capacity: CapacitySection | None) -> str | None:
    """What early aborts saved: queue wait from the replay (the only place a counterfactual queue exists), the
    tokens and slot time from the accounting (per request, not cut at the run's end as the replay is)."""
    rep = capacity.replay if capacity is not None else None
    pol = rep.policies if rep is not None else {}
    full, rec, perfect = pol.get("full"), pol.get("recorded"), pol.get("perfect")
    freed = _freed_words(accounting)
    if full is not None and rec is not None and full.queue_wait is not None and rec.queue_wait is not None:
        cut = full.queue_wait.p95 - rec.queue_wait.p95
        verb = "cut" if cut >= 0 else "lengthened"
        text = (f"Early aborts, replayed on this run's arrivals, {verb} p95 queue wait by {_s(abs(cut))} "
                f"({_s(full.queue_wait.p95)} had every stopped stream run to its end, {_s(rec.queue_wait.p95)} as "
                "run)")
        if perfect is not None and perfect.queue_wait is not None:
            more = rec.queue_wait.p95 - perfect.queue_wait.p95
            text += (f"; aborting every Stop at once would cut {_s(more)} more" if more > 0.0005 else
                     "; aborting every Stop at once would cut no more")
        text += f" [{rep.source if rep is not None else ''}]"
        return text + (f"; they {freed}." if freed else ".")
    return f"Aborts {freed}." if freed else None


def _failure_caveat(overall: Figures) -> list[str]:
    """Failed streams, first: a run whose streams failed (a server down, refusing or cutting streams off) is
    judged on the rest, and whoever reads only the verdict must know it."""
    failed, streams = _int(overall.failed) or 0, _int(overall.streams) or 0
    if not failed:
        return []
    counts = overall.failures.value if isinstance(overall.failures.value, Mapping) else {}
    top = max(counts.items(), key=lambda kv: kv[1], default=None)
    most = f" (most often: {top[0]}, {top[1]:,})" if top else ""
    if failed >= streams:
        return [f"Caveat: all {failed:,} streams failed{most}: the run measured none [{overall.failed.source}]."]
    return [f"Caveat: {failed:,} of {streams:,} streams failed{most}: the figures are of the other "
            f"{streams - failed:,} [{overall.failed.source}]."]


def _caveats(summary: Summary, flagged: Mapping[str, tuple[int, int]], partial_reason: str | None,
             search: CapacitySearch | None) -> list[str]:
    out = []
    if partial_reason:
        out.append(f"Partial run ({partial_reason}): the figures cover it until then.")
    t_f, t_n = flagged.get("ttft", (0, 0))
    i_f, i_n = flagged.get("itl", (0, 0))
    if t_f or i_f:
        out.append(f"Caveat: {t_f:,} of {t_n:,} TTFTs and {i_f:,} of {i_n:,} inter-token gaps overlapped a stall of "
                   "this load generator's own loop (self-monitor): they may hold its delay, not the server's.")
    planned = summary.planned_stacks
    if planned:
        missing = [s for s in planned if s not in summary.stacks]
        if missing:
            out.append(f"{len(missing)} of {len(planned)} client stacks sent no stream: {', '.join(missing)} "
                       "(too few users or too short a run).")
    if search is not None:
        thin = search.thin_steps()
        if thin:
            out.append(f"Caveat: {len(thin)} capacity step{'s' if len(thin) != 1 else ''} judged on fewer than "
                       f"{search.min_requests} requests ({', '.join(f'{s.users} users: {s.requests}' for s in thin)}): "
                       "too few for its quantile; lengthen --step-seconds.")
    return out


def _capacity_sentence(search: CapacitySearch) -> str:
    knee = search.knee
    if knee is None:
        return search.estimate or f"The server held no tested load within the SLO ({search.slo})."
    rates = []
    if knee.request_rate is not None:
        rates.append(f"{knee.request_rate:,.2f} req/s")
    if knee.output_rate is not None:
        rates.append(f"{knee.output_rate:,.1f} output tok/s")
    broke = next((s for s in search.steps if not s.held), None)
    text = f"Capacity: {knee.users} users within {search.slo}" + (f" ({', '.join(rates)} at the knee)" if rates else "")
    if broke is not None and broke.value_s is not None:
        text += f"; it broke at {broke.users} users ({broke.value_s:,.3f} s)"
    return text + f" [{knee.rate_source}]."


def verdict(accounting: Accounting, summary: Summary, capacity: CapacitySection | None, duration_s: float | None,
            flagged: Mapping[str, tuple[int, int]] | None = None, partial_reason: str | None = None,
            search: CapacitySearch | None = None) -> Verdict:
    """The run's verdict from its figures. `flagged`: the self-monitor's {"ttft": (flagged, checked), "itl": …}
    over every process; `search`: capacity.py's steps when it ran."""
    step = summary.step.value if isinstance(summary.step.value, int | float) else None
    bound = step_bound(step, accounting.zombie_grace_s)
    cells = tuple(_cell_verdict(c, bound) for c in accounting.cells
                  if c.close_mode != NOT_STOPPED and (_int(c.figures.stopped) or 0) > 0)
    o = accounting.overall
    sentences = [_stop_sentence(cells, bound, step is not None, o.abort_latency.source
                                if o.abort_latency.known else o.aborted.source)]
    zombie, share = _zombie_sentence(accounting, capacity, duration_s)
    if zombie:
        sentences.append(zombie)
    saved = _saved_sentence(accounting, capacity)
    if saved:
        sentences.append(saved)
    if search is not None:
        sentences.append(_capacity_sentence(search))
    caveats = tuple(_failure_caveat(o) + _caveats(summary, flagged or {}, partial_reason, search))
    return Verdict(tuple(sentences), bound, cells, share, caveats)


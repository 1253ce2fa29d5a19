"""Scenarios side by side: `stopstorm compare a.json b.json … [--replay] [--html out.html]`.

A capacity planner's question is a difference ("what do prompt aborts save against zombies, or against no
stops?"), so each figure is shown per scenario beside the first (the baseline), with the number of requests
behind it and, where the report keeps per-request samples (queue wait), a 95 % bootstrap interval of the
difference; reports that share a scenario name are repeats, and their spread is shown instead of one value.
The difference is said in plain words ("prompt waits 0.42 s less than zombies at p95"), never as a signed
"saved" delta, and one whose interval spans zero is said to be within noise. Inputs are saved Reports (their
JSON layout is in metrics/report/model.py). With `--replay`, a report's replay counterfactuals (perfect
aborts, no stops) join as scenarios of their own, so one run answers the question without a second run.
Every figure here is read from a Report; none is computed again (the intervals come from
metrics/analysis/verdict.py's bootstrap over the Report's own samples).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stopstorm.metrics.analysis.replay import ReplayResult
from stopstorm.metrics.analysis.verdict import bootstrap_difference
from stopstorm.metrics.figures import Distribution, Figure
from stopstorm.metrics.report.json_file import read_report
from stopstorm.metrics.report.model import Report

__all__ = ["FIGURES", "SHORT_RUN_S", "Comparison", "Scenario", "compare", "format_table", "load_scenarios",
           "noise_warning", "replay_scenario", "run_scenario", "scenario_figures"]

# (key, label, digits) in the order shown; smaller-is-better figures are named in _LOWER_IS_BETTER.
FIGURES: tuple[tuple[str, str, int], ...] = (
    ("queue_wait_p50", "queue wait p50 (s)", 3),
    ("queue_wait_p95", "queue wait p95 (s)", 3),
    ("queue_wait_p99", "queue wait p99 (s)", 3),
    ("ttft_p50", "server TTFT p50 (s)", 3),
    ("ttft_p95", "server TTFT p95 (s)", 3),
    ("throughput", "throughput (generated tok/s)", 1),
    ("goodput", "goodput (delivered tok/s)", 1),
    ("wasted_tokens", "wasted tokens", 0),
    ("zombie_slot_seconds", "zombie slot-seconds", 2),
    ("ran_on", "stopped streams that ran on (missed closes)", 0),
    ("energy_per_delivered_token", "energy per delivered token (J)", 4),
)
_LOWER_IS_BETTER = {"queue_wait_p50", "queue_wait_p95", "queue_wait_p99", "ttft_p50", "ttft_p95",
                    "wasted_tokens", "zombie_slot_seconds", "ran_on", "energy_per_delivered_token"}
# How a difference of each figure is said: a template with {s} (the scenario), {x} (the amount), {w} (the word
# for its direction: more or less) and {b} (the baseline), and the two direction words
_WORDS: Mapping[str, tuple[str, str, str]] = {
    **dict.fromkeys(("queue_wait_p50", "queue_wait_p95", "queue_wait_p99"),
                    ("{s} waits {x} {w} than {b}", "longer", "less")),
    **dict.fromkeys(("ttft_p50", "ttft_p95"), ("{s} gets its first tokens {x} {w} than {b}", "later", "sooner")),
    "throughput": ("{s} generates {x} {w} than {b}", "more", "less"),
    "goodput": ("{s} delivers {x} {w} to its readers than {b}", "more", "less"),
    "wasted_tokens": ("{s} wastes {x} {w} than {b}", "more", "fewer"),
    "zombie_slot_seconds": ("{s_} zombies hold {x} {w} than {b_}", "more", "less"),
    "ran_on": ("{s} has {x} {w} stopped streams that ran on than {b}", "more", "fewer"),
    "energy_per_delivered_token": ("{s} spends {x} {w} a delivered token than {b}", "more", "less"),
}
_UNITS = {"queue_wait_p50": "s", "queue_wait_p95": "s", "queue_wait_p99": "s", "ttft_p50": "s", "ttft_p95": "s",
          "throughput": "tok/s", "goodput": "tok/s", "wasted_tokens": "tokens", "zombie_slot_seconds": "slot-s",
          "ran_on": "", "energy_per_delivered_token": "J"}
_QUANTILE = {"queue_wait_p50": 0.5, "queue_wait_p95": 0.95, "queue_wait_p99": 0.99}


@dataclass(frozen=True, slots=True)
class Scenario:
    """One column of a comparison: a run's Report (or the median of its repeats), or one of its replay
    counterfactuals (no run of its own)."""

    label: str
    figures: Mapping[str, float | None]  # FIGURES' keys
    report: Report | None = None  # the run itself (plots need it); None for a replay policy
    counts: Mapping[str, int | None] = field(default_factory=dict)  # the requests behind each figure
    samples: Mapping[str, Sequence[float]] = field(default_factory=dict)  # per-request samples (queue wait)
    repeats: Sequence[Mapping[str, float | None]] = ()  # each repeat's figures, when there were several runs


def _num(f: Figure) -> float | None:
    return float(f.value) if isinstance(f.value, int | float) else None


def _q(d: Distribution | None, q: str) -> float | None:
    return None if d is None else float(getattr(d, q))


def scenario_figures(report: Report) -> dict[str, float | None]:
    """The compared figures of one run (None where the report lacks the truth for one)."""
    cap, o, gpu = report.capacity, report.accounting.overall, report.gpu
    # The run's queue wait: with a ledger, every request the server served (the replay's population too)
    qw = o.queue_wait.value if isinstance(o.queue_wait.value, Distribution) else None
    ttft = cap.ttft.value if cap is not None and isinstance(cap.ttft.value, Distribution) else None
    energy = _num(gpu.figure("energy")) if gpu is not None else None
    delivered = _num(o.goodput_tokens)
    return {
        "queue_wait_p50": _q(qw, "p50"), "queue_wait_p95": _q(qw, "p95"), "queue_wait_p99": _q(qw, "p99"),
        "ttft_p50": _q(ttft, "p50"), "ttft_p95": _q(ttft, "p95"),
        "throughput": _num(cap.throughput) if cap is not None else None,
        "goodput": _num(o.goodput_rate),
        "wasted_tokens": _num(o.wasted_tokens),
        "zombie_slot_seconds": _num(o.zombie_slot_seconds),
        "ran_on": _num(o.ran_on),
        "energy_per_delivered_token": energy / delivered if energy is not None and delivered else None,
    }


def _counts(report: Report) -> dict[str, int | None]:
    cap, o = report.capacity, report.accounting.overall
    qw = o.queue_wait.value.count if isinstance(o.queue_wait.value, Distribution) else None
    ttft = cap.ttft.value.count if cap is not None and isinstance(cap.ttft.value, Distribution) else None
    streams = int(o.streams.value) if isinstance(o.streams.value, int) else None
    served = len(cap.queue_wait_samples_s) if cap is not None else None
    return {"queue_wait_p50": qw, "queue_wait_p95": qw, "queue_wait_p99": qw, "ttft_p50": ttft, "ttft_p95": ttft,
            "throughput": served, "goodput": streams, "wasted_tokens": streams, "zombie_slot_seconds": streams,
            "ran_on": int(o.stopped.value) if isinstance(o.stopped.value, int) else None,
            "energy_per_delivered_token": streams}


def _samples(report: Report) -> dict[str, Sequence[float]]:
    cap = report.capacity
    if cap is None or not cap.queue_wait_samples_s:
        return {}
    return dict.fromkeys(_QUANTILE, cap.queue_wait_samples_s)


def run_scenario(report: Report, label: str | None = None) -> Scenario:
    return Scenario(label or report.label, scenario_figures(report), report, _counts(report), _samples(report))


def _repeated(label: str, reports: Sequence[Report]) -> Scenario:
    """Several runs of one scenario: each figure their median, the spread kept, the samples pooled."""
    each = [scenario_figures(r) for r in reports]
    figures: dict[str, float | None] = {}
    counts: dict[str, int | None] = {}
    for key, _l, _d in FIGURES:
        values = [v for f in each if (v := f.get(key)) is not None]
        figures[key] = statistics.median(values) if values else None
        ns = [n for r in reports if (n := _counts(r).get(key)) is not None]
        counts[key] = sum(ns) if ns else None
    pooled: dict[str, list[float]] = {}
    for r in reports:
        for key, s in _samples(r).items():
            pooled.setdefault(key, []).extend(s)
    return Scenario(label, figures, reports[0], counts, {k: sorted(v) for k, v in pooled.items()}, each)


def replay_scenario(label: str, policy: str, r: ReplayResult) -> Scenario:
    """A replay policy's result as a column: what the replay says, and nothing it does not."""
    qw, ttft = r.queue_wait, r.ttft
    n = r.requests
    return Scenario(f"{label} (replay: {policy})", {
        "queue_wait_p50": _q(qw, "p50"), "queue_wait_p95": _q(qw, "p95"), "queue_wait_p99": _q(qw, "p99"),
        "ttft_p50": _q(ttft, "p50"), "ttft_p95": _q(ttft, "p95"),
        "throughput": r.throughput, "goodput": r.goodput, "wasted_tokens": float(r.wasted_tokens),
        "zombie_slot_seconds": 0.0 if policy == "perfect" else None, "ran_on": 0.0 if policy == "perfect" else None,
        "energy_per_delivered_token": None,
    }, counts=dict.fromkeys((k for k, _l, _d in FIGURES), n or None))


def load_scenarios(paths: Sequence[str], with_replay: bool = False,
                   labels: Sequence[str] | None = None) -> list[Scenario]:
    """The reports, each labelled by `labels` (else its scenario name, else its file name); reports that share
    a label are repeats of one scenario (one column, their median and spread); with replay scenarios if asked."""
    groups: dict[str, list[Report]] = {}
    for k, p in enumerate(paths):
        try:
            report = read_report(p)
        except ValueError as exc:
            raise SystemExit(f"stopstorm compare: {exc}") from None
        label = labels[k] if labels is not None else report.meta.scenario or Path(p).stem
        groups.setdefault(label, []).append(report)
    out: list[Scenario] = []
    for label, reports in groups.items():
        out.append(run_scenario(reports[0], label) if len(reports) == 1 else _repeated(label, reports))
        replay = reports[0].capacity.replay if reports[0].capacity is not None else None
        if with_replay and replay is not None:
            out += [replay_scenario(label, pol, replay.policies[pol]) for pol in ("perfect", "full")
                    if pol in replay.policies]
    return out


# --- differences, in words -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Comparison:
    """One figure of one scenario against the baseline: the difference, its noise, and the sentence."""

    key: str
    scenario: str
    baseline: str
    value: float
    base: float
    n: int | None
    base_n: int | None
    interval: tuple[float, float] | None  # 95 % bootstrap interval of value − base
    spread: tuple[float, float] | None  # min–max over repeats, when there were several runs
    within_noise: bool

    @property
    def diff(self) -> float:
        return self.value - self.base

    def words(self, digits: int) -> str:
        """'prompt waits 0.420 s less than zombies at p95 (95 % interval 0.300 to 0.550 s; n 120 vs 118)'."""
        template, more, less = _WORDS.get(self.key, ("{s} is {x} {w} than {b}", "more", "less"))
        unit = _UNITS.get(self.key, "")
        label = next((lab for k, lab, _d in FIGURES if k == self.key), self.key)
        d = self.diff
        if abs(d) < 0.5 * 10 ** -digits:
            text = f"{self.scenario}: {label} the same as {self.baseline} ({self.value:,.{digits}f})"
        else:
            amount = f"{abs(d):,.{digits}f} {unit}".strip()
            if self.key == "wasted_tokens":
                amount = f"{abs(d):,.{digits}f}"  # "wastes 100 fewer tokens"
            word = more if d > 0 else less
            if self.key == "wasted_tokens":
                word += " tokens"
            where = f" at p{self.key.rsplit('_p', 1)[1]}" if self.key.rsplit("_p", 1)[-1].isdigit() else ""
            pct = f", {d / self.base * 100:+.0f} %" if self.base else ""
            text = (template.format(s=self.scenario, x=amount, w=word, b=self.baseline, s_=_owner(self.scenario),
                                    b_=_owner(self.baseline)) + where
                    + f" ({self.value:,.{digits}f} vs {self.base:,.{digits}f}{pct})")
        notes = []
        if self.interval is not None:
            lo, hi = self.interval

            def amt(v: float) -> str:
                return f"{abs(v):,.{digits}f}"

            if hi <= 0:
                span = f"{amt(hi)} to {amt(lo)} {unit} {less}"
            elif lo >= 0:
                span = f"{amt(lo)} to {amt(hi)} {unit} {more}"
            else:
                span = f"{amt(lo)} {unit} {less} to {amt(hi)} {unit} {more}"
            notes.append(f"95 % interval {span}")
        if self.spread is not None:
            notes.append(f"repeats {self.spread[0]:,.{digits}f} to {self.spread[1]:,.{digits}f}")
        if self.n is not None or self.base_n is not None:
            notes.append(f"n {'?' if self.n is None else f'{self.n:,}'} vs "
                         f"{'?' if self.base_n is None else f'{self.base_n:,}'}")
        if notes:
            text += "; " + "; ".join(notes)
        if self.within_noise:
            text += ": within noise"
        return text


def _owner(label: str) -> str:
    return f"{label}'" if label.endswith("s") else f"{label}'s"


def compare(base: Scenario, s: Scenario, key: str) -> Comparison | None:
    """`s` against `base` for one figure; None where either lacks it."""
    v, b = s.figures.get(key), base.figures.get(key)
    if v is None or b is None:
        return None
    interval = None
    q = _QUANTILE.get(key)
    if q is not None and key in s.samples and key in base.samples:
        interval = bootstrap_difference(base.samples[key], s.samples[key], q)
    spread = None
    values = [r.get(key) for r in s.repeats]
    known = [x for x in values if x is not None]
    if len(known) > 1:
        spread = (min(known), max(known))
    base_known = [x for r in base.repeats if (x := r.get(key)) is not None]
    noise = False
    if interval is not None:
        noise = interval[0] <= 0 <= interval[1]
    elif spread is not None and len(base_known) > 1:  # the two scenarios' repeats overlap
        noise = not (max(known) < min(base_known) or min(known) > max(base_known))
    return Comparison(key, s.label, base.label, v, b, s.counts.get(key), base.counts.get(key), interval, spread,
                      noise)


SHORT_RUN_S = 60.0  # below this a single run's rates and totals say little about the next run


def noise_warning(scenarios: Sequence[Scenario]) -> str | None:
    """A line when the runs are short and not repeated: only queue wait has an interval then."""
    short = [(s.label, d) for s in scenarios if s.report is not None and not s.repeats
             and (d := s.report.meta.duration_s) is not None and d < SHORT_RUN_S]
    if not short:
        return None
    names = ", ".join(f"{label} {d:.0f} s" for label, d in short)
    return (f"Short single runs ({names}): rates, totals and TTFT carry no noise estimate here, and a difference "
            f"may not repeat; run each scenario for {SHORT_RUN_S:.0f} s or more, or repeat it (reports with the same "
            "scenario name are pooled, their spread shown).")


def format_table(scenarios: Sequence[Scenario]) -> str:
    """A Markdown table, one row per figure, one column per scenario (n beside each value), then what each
    scenario differs in from the first, in words, with its noise."""
    labels = [s.label for s in scenarios]
    head = ["figure", f"{labels[0]} (baseline)", *labels[1:]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(labels)]
    for key, label, digits in FIGURES:
        cells = []
        for s in scenarios:
            x = s.figures.get(key)
            n = s.counts.get(key)
            cells.append("–" if x is None else f"{x:,.{digits}f}" + (f" (n {n:,})" if n is not None else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    said = []
    for s in scenarios[1:]:
        if s.report is None:
            continue  # a replay column is a model of its run: it is in the table, not weighed against the baseline
        for key, _label, digits in FIGURES:
            c = compare(scenarios[0], s, key)
            if c is not None:
                said.append(f"- {c.words(digits)}")
    if said:
        lines.append(f"Against {labels[0]}:")
        lines += said
        lines.append("")
    warning = noise_warning(scenarios)
    if warning:
        lines += [f"Warning: {warning}", ""]
    lines.append("n: the requests behind a figure. Intervals: a 95 % bootstrap over the reports' per-request samples "
                 "(queue wait; it takes requests as independent, and neighbours in one queue are not, so it is the "
                 "least noise to expect: repeats are the firmer test); a difference whose interval spans 0, or whose "
                 "repeats overlap, is within noise. '–': the report lacks that truth.")
    return "\n".join(lines)

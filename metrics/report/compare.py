"""Scenarios side by side: `stopstorm compare a.json b.json … [--replay] [--html out.html]`.

A capacity planner's question is a difference ("what do prompt aborts save against zombies, or against no
stops?"), so each figure is shown per scenario with its delta against the first (the baseline), and queue wait
as "saved" (baseline minus scenario: positive is better). Inputs are saved Reports (their JSON layout is in
metrics/report/model.py). With `--replay`, a report's replay counterfactuals (perfect aborts, no stops) join
as scenarios of their own, so one run answers the question without a second run. Every figure here is read
from a Report; none is computed again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stopstorm.metrics.analysis.replay import ReplayResult
from stopstorm.metrics.figures import Distribution, Figure
from stopstorm.metrics.report.json_file import read_report
from stopstorm.metrics.report.model import Report

__all__ = ["FIGURES", "Scenario", "format_table", "load_scenarios", "replay_scenario", "run_scenario",
           "scenario_figures"]

# (key, label, digits) in the order shown; smaller-is-better figures are named in _LOWER_IS_BETTER.
FIGURES: tuple[tuple[str, str, int], ...] = (
    ("queue_wait_p50", "queue wait p50 (s)", 3),
    ("queue_wait_p95", "queue wait p95 (s)", 3),
    ("queue_wait_p99", "queue wait p99 (s)", 3),
    ("ttft_p50", "TTFT p50 (s)", 3),
    ("ttft_p95", "TTFT p95 (s)", 3),
    ("throughput", "throughput (generated tok/s)", 1),
    ("goodput", "goodput (delivered tok/s)", 1),
    ("wasted_tokens", "wasted tokens", 0),
    ("zombie_slot_seconds", "zombie slot-seconds", 2),
    ("ran_on", "stopped streams that ran on (missed closes)", 0),
    ("energy_per_delivered_token", "energy per delivered token (J)", 4),
)
_LOWER_IS_BETTER = {"queue_wait_p50", "queue_wait_p95", "queue_wait_p99", "ttft_p50", "ttft_p95",
                    "wasted_tokens", "zombie_slot_seconds", "ran_on", "energy_per_delivered_token"}


@dataclass(frozen=True, slots=True)
class Scenario:
    """One column of a comparison: a run's Report, or one of its replay counterfactuals (no run of its own)."""

    label: str
    figures: Mapping[str, float | None]  # FIGURES' keys
    report: Report | None = None  # the run itself (plots need it); None for a replay policy


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


def run_scenario(report: Report, label: str | None = None) -> Scenario:
    return Scenario(label or report.label, scenario_figures(report), report)


def replay_scenario(label: str, policy: str, r: ReplayResult) -> Scenario:
    """A replay policy's result as a column: what the replay says, and nothing it does not."""
    qw, ttft = r.queue_wait, r.ttft
    return Scenario(f"{label} (replay: {policy})", {
        "queue_wait_p50": _q(qw, "p50"), "queue_wait_p95": _q(qw, "p95"), "queue_wait_p99": _q(qw, "p99"),
        "ttft_p50": _q(ttft, "p50"), "ttft_p95": _q(ttft, "p95"),
        "throughput": r.throughput, "goodput": r.goodput, "wasted_tokens": float(r.wasted_tokens),
        "zombie_slot_seconds": 0.0 if policy == "perfect" else None, "ran_on": 0.0 if policy == "perfect" else None,
        "energy_per_delivered_token": None,
    })


def load_scenarios(paths: Sequence[str], with_replay: bool = False) -> list[Scenario]:
    """The reports, each labelled by its scenario name (else its file name); with replay scenarios if asked."""
    out: list[Scenario] = []
    for p in paths:
        try:
            report = read_report(p)
        except ValueError as exc:
            raise SystemExit(f"stopstorm compare: {exc}") from None
        label = report.meta.scenario or Path(p).stem
        out.append(run_scenario(report, label))
        replay = report.capacity.replay if report.capacity is not None else None
        if with_replay and replay is not None:
            out += [replay_scenario(label, pol, replay.policies[pol]) for pol in ("perfect", "full")
                    if pol in replay.policies]
    return out


def _delta(key: str, base: float | None, v: float | None, digits: int) -> str:
    if base is None or v is None:
        return ""
    d = v - base
    text = f"saved {-d:+,.{digits}f}" if key.startswith("queue_wait") else f"{d:+,.{digits}f}"
    if base:
        text += f" ({d / base * 100:+.0f} %)"
    return text


def format_table(scenarios: Sequence[Scenario]) -> str:
    """A Markdown table: one row per figure, one column per scenario, deltas against the first."""
    labels = [s.label for s in scenarios]
    head = ["figure", f"{labels[0]} (baseline)", *labels[1:]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(labels)]
    for key, label, digits in FIGURES:
        base = scenarios[0].figures.get(key)
        cells = ["–" if base is None else f"{base:,.{digits}f}"]
        for s in scenarios[1:]:
            x = s.figures.get(key)
            cells.append("–" if x is None else f"{x:,.{digits}f} {_delta(key, base, x, digits)}".strip())
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Deltas are against the baseline; queue wait 'saved' is baseline minus scenario (positive: "
                 "shorter waits). '–': the report lacks that truth.")
    return "\n".join(lines)

"""Thresholds a CI gates on: `--fail-on EXPR`, each a condition over the run's final figures that breaks the build.

    --fail-on zombie_slot_seconds>0 --fail-on "abort_latency.p99>0.05" --fail-on failed_ratio>0.01
    --fail-on "zombies[openai/*]>0"          # any cell of the openai stack
    --fail-on capacity.ttft.p99>1            # the server's TTFT (arrival → first token, simulator ledger)

An expression names what breaks the build: `REF OP NUMBER`, where OP is one of `> >= < <= == !=` and NUMBER may
end in `ms` or `s` for figures in seconds. REF is a figure of the report:

- a bare NAME is an overall figure (`zombies`, `wasted_tokens`, `queue_wait`, `ttft`, …: the report's cell
  figures), a run figure (`unmatched_requests`, `ledger_aborts`, …) or a ratio made of them (`RATIOS`);
- `NAME[STACK/MODE]` is that figure of one stack × close mode cell; `*` stands for any stack or mode, and the
  threshold breaks when any matching cell does;
- `run.NAME`, `capacity.NAME` (`ttft`, `generated_tokens`, `throughput`) and `gpu.NAME` (the GPU figures) name
  the other sections' figures;
- a distribution takes one of its statistics after a dot: `.p50 .p90 .p95 .p99 .max .mean .count`.

Each threshold is judged on the final Report's figures, never on a sample of them: it *holds* when the condition
is false and *breaks* when it is true. A figure whose truth was unavailable (null: no ledger for a ledger figure,
an empty distribution, a cell that is not there) cannot be checked, and breaks: a gate that cannot see must not
pass. Any broken threshold makes the run's exit status `EXIT_THRESHOLD_BROKEN` (3), unless a signal cut the run
short (4, metrics/plugin/signals.py). Expressions are parsed when the run starts, so a typo is refused before
any load (exit 2), with the names it could have meant.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from stopstorm.metrics.analysis.accounting import Accounting, Figures, RunFigures
from stopstorm.metrics.figures import Distribution, Figure

__all__ = ["EXIT_THRESHOLD_BROKEN", "RATIOS", "Threshold", "ThresholdResult", "describe", "evaluate",
           "parse_threshold", "parse_thresholds", "result_lines"]

EXIT_THRESHOLD_BROKEN = 3
"""The exit status of a run that broke a --fail-on threshold (Locust's own: 0 passed, 1 a request failed, 2 an
error; 4: a signal cut the run short)."""

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}
_STATS = ("count", "p50", "p90", "p95", "p99", "max", "mean")
# Cell (and overall) figures that are distributions (need a statistic) and that are not numbers at all.
_DISTRIBUTIONS = frozenset({"abort_latency", "queue_wait", "log_abort_latency", "ttft"})
_NOT_NUMBERS = frozenset({"failures", "blind_spot"})
_CELL = frozenset(f.name for f in fields(Figures))
_RUN = frozenset(f.name for f in fields(RunFigures))
_CAPACITY = {"ttft": True, "generated_tokens": False, "throughput": False}  # name: is a distribution
_GPU = {"gpu_busy_seconds": False, "energy": False, "mean_power": False, "energy_per_delivered_token": False,
        "wasted_gpu_seconds": False, "wasted_energy": False, "idle_stops": False, "stop_to_idle": True}
_SECONDS = frozenset({"abort_latency", "queue_wait", "log_abort_latency", "ttft", "zombie_slot_seconds",
                      "freed_slot_seconds", "duration", "stop_to_idle", "gpu_busy_seconds", "wasted_gpu_seconds"})

RATIOS: dict[str, tuple[str, tuple[str, ...], str]] = {
    # name: (numerator, denominator terms summed, what it means)
    "failed_ratio": ("failed", ("streams",), "failed / streams"),
    "wasted_tokens_ratio": ("wasted_tokens", ("wasted_tokens", "goodput_tokens"),
                            "wasted / (wasted + read): the share of generated tokens nobody read"),
    "zombie_ratio": ("zombies", ("stopped",), "zombies / stopped streams"),
    "aborted_ratio": ("aborted", ("stopped",), "aborted / stopped streams"),
    "interrupted_ratio": ("interrupted", ("streams",), "interrupted by the run's end / streams"),
}

_REF = re.compile(r"^(?:(?P<section>run|capacity|gpu)\.)?(?P<name>[a-z_]+)"
                  r"(?:\[(?P<stack>[A-Za-z0-9_*-]+)/(?P<mode>[A-Za-z0-9_*-]+)\])?(?:\.(?P<stat>[a-z0-9]+))?$")
_NUMBER = re.compile(r"^(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<unit>ms|s)?$")


@dataclass(frozen=True, slots=True)
class Threshold:
    """One `--fail-on` condition, parsed."""

    text: str  # as given, spaces dropped
    section: str  # "overall", "cell", "run", "capacity", "gpu"
    name: str
    stat: str | None  # a distribution's statistic
    stack: str | None  # a cell's (`*`: any)
    mode: str | None
    op: str
    limit: float

    def breaks(self, value: float) -> bool:
        return _OPS[self.op](value, self.limit)


@dataclass(frozen=True, slots=True)
class ThresholdResult:
    """A threshold judged: `held` False when it broke (or could not be checked: `value` None)."""

    expr: str
    value: float | None
    held: bool
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"expr": self.expr, "value": self.value, "held": self.held, "note": self.note}

    @classmethod
    def from_json(cls, doc: Any) -> ThresholdResult:
        d = doc if isinstance(doc, Mapping) else {}
        value = d.get("value")
        return cls(str(d.get("expr", "")), float(value) if isinstance(value, int | float) else None,
                   bool(d.get("held", False)), d.get("note"))


def _names() -> str:
    return ", ".join(sorted((_CELL - _NOT_NUMBERS) | _RUN - _NOT_NUMBERS | set(RATIOS)))


def parse_threshold(text: str) -> Threshold:
    """One expression; ValueError naming `--fail-on` and what is wrong."""
    expr = "".join(str(text).split())
    def refuse(why: str) -> ValueError:
        return ValueError(f"--fail-on {text!r}: {why}")

    for op in _OPS:  # two-character operators first (the dict's order)
        left, sep, right = expr.partition(op)
        if sep:
            break
    else:
        raise refuse("expected FIGURE OP NUMBER, OP one of > >= < <= == != (e.g. zombie_slot_seconds>0)")
    ref = _REF.match(left)
    if ref is None:
        raise refuse(f"{left!r} is not a figure (NAME, NAME[STACK/MODE], run.NAME, capacity.NAME or gpu.NAME, "
                     "then .p99 or another statistic for a distribution)")
    number = _NUMBER.match(right)
    if number is None:
        raise refuse(f"{right!r} is not a number")
    limit = float(number["num"])
    section, name, stat = ref["section"], ref["name"], ref["stat"]
    cell = ref["stack"] is not None
    if section is None:
        if name in _CELL or name in RATIOS:
            section = "cell" if cell else "overall"
        elif name in _RUN:
            section = "run"
        else:
            raise refuse(f"no figure {name!r}; the figures are: {_names()} (and run., capacity., gpu. ones)")
        distribution = name in _DISTRIBUTIONS
    elif section == "run":
        if name not in _RUN:
            raise refuse(f"no run figure {name!r}; they are: {', '.join(sorted(_RUN))}")
        distribution = False
    else:
        table = _CAPACITY if section == "capacity" else _GPU
        if name not in table:
            raise refuse(f"no {section} figure {name!r}; they are: {', '.join(sorted(table))}")
        distribution = table[name]
    if cell and section not in ("cell",):
        raise refuse("[STACK/MODE] names a cell: only the cell figures have one")
    if name in _NOT_NUMBERS:
        raise refuse(f"{name} is not a number")
    if distribution and stat not in _STATS:
        raise refuse(f"{name} is a distribution: name one of its statistics, e.g. {name}.p99 "
                     f"({', '.join(_STATS)})")
    if not distribution and stat is not None:
        raise refuse(f"{name} is a number, not a distribution: drop .{stat}")
    if number["unit"] is not None:
        if name not in _SECONDS or (stat == "count"):
            raise refuse(f"{name} is not in seconds: give a plain number")
        if number["unit"] == "ms":
            limit /= 1e3
    if not math.isfinite(limit):
        raise refuse("the limit must be a finite number")
    return Threshold(expr, section, name, stat, ref["stack"], ref["mode"], op, limit)


def parse_thresholds(values: str | Iterable[str] | None) -> tuple[Threshold, ...]:
    """Every expression of a repeatable option (each value may also hold several, comma-separated)."""
    if values is None:
        return ()
    items = [values] if isinstance(values, str) else list(values)
    out = []
    for item in items:
        for part in str(item).split(","):
            if part.strip():
                out.append(parse_threshold(part))
    return tuple(out)


def _number(figure: Figure | None, stat: str | None) -> tuple[float | None, str | None]:
    """A figure's value as a number (a distribution's statistic); None and why, when there is none."""
    if figure is None:
        return None, "no such figure in this report"
    value = figure.value
    if value is None:
        return None, f"unavailable ({figure.source}{': ' + figure.note if figure.note else ''})"
    if isinstance(value, Distribution):
        if stat is None:
            return None, "a distribution, no statistic named"
        return float(getattr(value, stat)), None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, "not a number"
    return float(value), None


def _ratio(figures: Figures, name: str) -> tuple[float | None, str | None]:
    num_name, den_names, _ = RATIOS[name]
    num, why = _number(getattr(figures, num_name), None)
    if num is None:
        return None, f"{num_name} {why}"
    den = 0.0
    for d in den_names:
        part, why = _number(getattr(figures, d), None)
        if part is None:
            return None, f"{d} {why}"
        den += part
    if den <= 0:
        return None, f"no {' + '.join(den_names)} to divide by"
    return num / den, None


def _cell_value(figures: Figures, t: Threshold) -> tuple[float | None, str | None]:
    if t.name in RATIOS:
        return _ratio(figures, t.name)
    return _number(getattr(figures, t.name), t.stat)


def _judge(t: Threshold, values: Sequence[tuple[str, float | None, str | None]]) -> ThresholdResult:
    """From (where, value, why unknown) of every figure the threshold names: broken if any breaks or is unknown."""
    if not values:
        return ThresholdResult(t.text, None, False, "no such cell in this run: cannot be checked, so broken")
    unknown = [(w, why) for w, v, why in values if v is None]
    broken = [(w, v) for w, v, _ in values if v is not None and t.breaks(v)]
    known = [v for _, v, _ in values if v is not None]
    pick = max if t.op in (">", ">=") else min if t.op in ("<", "<=") else (lambda xs: xs[0])
    shown = pick([v for _, v in broken]) if broken else (pick(known) if known else None)
    notes = []
    if broken and len(values) > 1:
        notes.append("broken in " + ", ".join(w for w, _ in broken))
    if unknown:
        notes.append("; ".join(f"{w + ': ' if len(values) > 1 else ''}{why}" for w, why in unknown)
                     + ": cannot be checked, so broken")
    return ThresholdResult(t.text, shown, not broken and not unknown, "; ".join(notes) or None)


def evaluate(thresholds: Iterable[Threshold], accounting: Accounting, capacity: Any = None,
             gpu: Any = None) -> tuple[ThresholdResult, ...]:
    """Every threshold judged on a run's final figures: its accounting, and its capacity and GPU sections
    (metrics/analysis/capacity.py `CapacitySection`, metrics/analysis/gpu_attribution.py `GpuSection`) when
    it has them."""
    out = []
    for t in thresholds:
        values: list[tuple[str, float | None, str | None]]
        if t.section == "overall":
            values = [("all", *_cell_value(accounting.overall, t))]
        elif t.section == "cell":
            values = [(f"{c.stack}/{c.close_mode}", *_cell_value(c.figures, t)) for c in accounting.cells
                      if t.stack in ("*", c.stack) and t.mode in ("*", c.close_mode)]
        elif t.section == "run":
            values = [("run", *_number(getattr(accounting.run, t.name), None))]
        else:
            section = capacity if t.section == "capacity" else gpu
            holder = getattr(section, "figures", None) if t.section == "gpu" else section
            figure = (holder.get(t.name) if isinstance(holder, Mapping)
                      else getattr(holder, t.name, None) if holder is not None else None)
            value, why = _number(figure, t.stat)
            if section is None:
                why = f"this run has no {t.section} section"
            values = [(t.section, value, why)]
        out.append(_judge(t, values))
    return tuple(out)


def describe(result: ThresholdResult) -> str:
    """One line: `held   zombie_slot_seconds>0   (0)` or `BROKEN ...   (3.2; …)`."""
    value = "–" if result.value is None else f"{result.value:.6g}"
    note = f"; {result.note}" if result.note else ""
    return f"{'held  ' if result.held else 'BROKEN'}  {result.expr}  ({value}{note})"


def result_lines(results: Sequence[ThresholdResult]) -> str:
    """The thresholds' block for the console: a heading, then one line each."""
    if not results:
        return ""
    broken = sum(not r.held for r in results)
    head = (f"stopstorm thresholds: {broken} of {len(results)} broken (exit status {EXIT_THRESHOLD_BROKEN})"
            if broken else f"stopstorm thresholds: all {len(results)} held")
    return "\n".join([head, *(f"  {describe(r)}" for r in results)])

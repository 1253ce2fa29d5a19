"""What the GPU spent over a run, and how much of it went on tokens nobody read: pure functions over samples.

Inputs are a GPU source's samples (metrics/truth/gpu.py or metrics/truth/dcgm.py), the run's window on the
`time.monotonic()` clock, the stream records (their Stop marks and in-flight spans) and two token counts the
abort accounting already has (tokens delivered, tokens wasted). No I/O.

The rules, stated once:

- **GPU-busy seconds** = ∫ utilisation/100 dt over the run, summed over the chosen GPUs. NVML's utilisation is
  the share of its sample period in which a kernel ran, so this is kernel-busy time, not SM occupancy. Each
  reading covers the period that ends at its timestamp; the driver's own high-rate samples are used where the
  source has them, the polled readings otherwise.
- **Energy** = Δ of the driver's total-energy counter over the run (per GPU, summed); where a GPU has no counter,
  ∫ power dt from the polled readings, and the figure's note says so.
- **Energy per delivered token** = energy ÷ tokens delivered to users still reading.
- **Wasted GPU-seconds and energy**: every generated token is charged the same share of the run's GPU time and
  energy (in a batched decode step each running sequence gets one token for the same step), so waste =
  total × wasted ÷ (delivered + wasted). It is an attribution, not a measurement: idle power between requests
  is shared out too, which the note says.
- **Stop → utilisation drop**, for stops that left the GPU idle: a Stop while the GPUs were busy (utilisation
  above `idle_pct`), with no other stream in flight from the Stop to the drop; the time from the Stop to the
  first reading at or below `idle_pct` on every chosen GPU, looked for within `window_s`. This is the seed's
  nvtop step, as a number. A stack that does not close on Stop shows here as seconds.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stopstorm.metrics.analysis.accounting import Accounting, Cell
from stopstorm.metrics.figures import CLIENT_SOURCE, UNAVAILABLE, Distribution, Figure, Table, distribution
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.truth.gpu import GpuReadings, GpuSample, UtilSample

__all__ = ["GPU_FIGURES", "IDLE_PCT", "STOPS_COLUMNS", "STOP_WINDOW_S", "TIMELINE_COLUMNS", "GpuCell", "GpuFigures",
           "GpuSection", "attribute", "gpu_section", "stop_marks", "timeline_rows", "waste_share"]

IDLE_PCT = 5.0
STOP_WINDOW_S = 10.0
TIMELINE_COLUMNS = ("t_s", "gpu", "util_pct", "power_w", "energy_j", "mem_used_bytes", "sm_clock_mhz")


@dataclass(frozen=True, slots=True)
class GpuFigures:
    """The run's GPU figures, each with its unit and source."""

    gpu_busy_seconds: Figure
    energy: Figure
    mean_power: Figure
    energy_per_delivered_token: Figure
    wasted_gpu_seconds: Figure
    wasted_energy: Figure
    idle_stops: Figure  # stops that left the GPU idle (the ones stop_to_idle measures)
    stop_to_idle: Figure  # Distribution, s
    # The same two per client stack × close mode: (stack, close_mode, idle_stops, stop_to_idle), sorted.
    cells: tuple[tuple[str, str, Figure, Figure], ...] = ()
    # Each measured stop: request id → seconds from Stop to the drop.
    stop_to_idle_by_request: dict[str, float] = field(default_factory=dict)

    def items(self) -> list[tuple[str, Figure]]:
        return [(name, getattr(self, name)) for name in self.__slots__
                if name not in ("cells", "stop_to_idle_by_request")]


def _unknown(unit: str, note: str | None = None) -> Figure:
    return Figure(None, unit, UNAVAILABLE, note)


def _util_series(samples: Sequence[GpuSample],
                 util_samples: Sequence[UtilSample]) -> dict[int, list[tuple[float, float]]]:
    """Per GPU, (t, util %) sorted by time: the driver's samples where a GPU has them, else the polled ones."""
    series: dict[int, list[tuple[float, float]]] = {}
    for u in util_samples:
        series.setdefault(u.gpu, []).append((u.t, u.util_pct))
    polled: dict[int, list[tuple[float, float]]] = {}
    for s in samples:
        if s.util_pct is not None:
            polled.setdefault(s.gpu, []).append((s.t, s.util_pct))
    for gpu, pts in polled.items():
        series.setdefault(gpu, pts)
    return {gpu: sorted(pts) for gpu, pts in series.items()}


def _integrate(points: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """∫ value dt over [start, end], each value holding over the period that ends at its timestamp."""
    total, prev = 0.0, start
    for t, v in points:
        if t <= start:
            continue
        hi = min(t, end)
        if hi > prev:
            total += v * (hi - prev)
        prev = max(prev, hi)
        if t >= end:
            break
    return total


def _energy(samples: Sequence[GpuSample], start: float, end: float) -> tuple[float | None, str | None]:
    """Joules over the window: counter Δ per GPU where it has one, else ∫ power dt; note when it fell back."""
    by_gpu: dict[int, list[GpuSample]] = {}
    for s in samples:
        by_gpu.setdefault(s.gpu, []).append(s)
    total, fell_back = 0.0, []
    for gpu, pts in sorted(by_gpu.items()):
        inside = [p for p in pts if start <= p.t <= end] or pts
        counters = [p.energy_j for p in inside if p.energy_j is not None]
        if len(counters) >= 2:
            total += counters[-1] - counters[0]
            continue
        power = sorted((p.t, p.power_w) for p in pts if p.power_w is not None)
        if len(power) < 2:
            return None, f"GPU {gpu} has neither an energy counter nor power readings"
        total += _integrate(power, start, end)
        fell_back.append(gpu)
    note = f"∫ power dt on GPU {', '.join(map(str, fell_back))} (no energy counter)" if fell_back else None
    return total, note


def stop_marks(records: Iterable[StreamRecord], start: float) -> list[float]:
    """Every Stop of the run, in seconds since its start, sorted."""
    return sorted(r.stop - start for r in records if r.stop is not None)


def _latest_other_end(records: Sequence[StreamRecord]) -> Callable[[float, StreamRecord], float]:
    """A lookup: the latest end of any stream sent before `t`, other than `r` (prefix top-two of ends by send
    time, so each question costs one bisection however long the run)."""
    spans = sorted((r.sent, r.closed or r.ended or r.stop or r.sent, id(r)) for r in records)
    sents = [s for s, _, _ in spans]
    top: list[tuple[float, int, float]] = []  # (largest end, its record id, second largest end) over spans[:i+1]
    best, best_id, second = -math.inf, 0, -math.inf
    for _, end, rid in spans:
        if end > best:
            best, best_id, second = end, rid, best
        elif end > second:
            second = end
        top.append((best, best_id, second))

    def lookup(t: float, r: StreamRecord) -> float:
        k = bisect.bisect_left(sents, t)
        if k == 0:
            return -math.inf
        b, bid, sec = top[k - 1]
        return sec if bid == id(r) else b

    return lookup


def _stop_to_idle(records: Sequence[StreamRecord], series: dict[int, list[tuple[float, float]]],
                  idle_pct: float, window_s: float) -> list[tuple[StreamRecord, float]]:
    if not series:
        return []
    merged = sorted((t, gpu, u) for gpu, pts in series.items() for t, u in pts)
    times = [m[0] for m in merged]
    gpu_times = {gpu: [t for t, _ in pts] for gpu, pts in series.items()}
    other_end = _latest_other_end(records)
    out = []
    for r in records:
        if r.stop is None:
            continue
        stop = r.stop
        latest: dict[int, float] = {}
        for gpu, pts in series.items():
            i = bisect.bisect_right(gpu_times[gpu], stop) - 1
            if i >= 0:
                latest[gpu] = pts[i][1]
        if not latest or max(latest.values()) <= idle_pct:
            continue  # idle (or unknown) at Stop: nothing to measure
        drop = None
        j = bisect.bisect_right(times, stop)
        while j < len(merged) and merged[j][0] <= stop + window_s:
            t, gpu, u = merged[j]
            latest[gpu] = u
            if len(latest) == len(series) and max(latest.values()) <= idle_pct:
                drop = t
                break
            j += 1
        if drop is None:
            continue
        if other_end(drop, r) > stop:
            continue  # another stream was in flight between Stop and the drop: this stop did not idle the GPU
        out.append((r, drop - stop))
    return out


def attribute(samples: Sequence[GpuSample], util_samples: Sequence[UtilSample], start: float, end: float,
              records: Sequence[StreamRecord], delivered_tokens: int | float | None,
              wasted_tokens: int | float | None, source: str, tokens_source: str,
              idle_pct: float = IDLE_PCT, window_s: float = STOP_WINDOW_S,
              delivered_source: str = CLIENT_SOURCE) -> GpuFigures:
    """The run's GPU figures over [start, end] (time.monotonic()); `tokens_source` is where the wasted-token
    count comes from, `delivered_source` the delivered one."""
    duration = end - start
    series = _util_series(samples, util_samples)
    busy = (math.fsum(_integrate(pts, start, end) for pts in series.values()) / 100.0) if series else None
    energy, energy_note = _energy(samples, start, end) if samples else (None, "no samples")
    busy_f = Figure(busy, "GPU-s", source, "∫ utilisation dt, summed over GPUs") if busy is not None \
        else _unknown("GPU-s", "no utilisation readings")
    energy_f = Figure(energy, "J", source, energy_note or "Δ total-energy counter") if energy is not None \
        else _unknown("J", energy_note)
    power_f = Figure(energy / duration, "W", source, "energy ÷ run duration") if energy is not None and duration > 0 \
        else _unknown("W")
    both = f"{source} + {tokens_source}"
    if energy is not None and delivered_tokens:
        per_token = Figure(energy / delivered_tokens, "J/token", f"{source} + {delivered_source}",
                           "energy ÷ tokens delivered to readers")
    else:
        per_token = _unknown("J/token", "needs energy and delivered tokens")
    rule = "share = wasted ÷ (delivered + wasted): each generated token charged alike, idle time included"
    generated = (delivered_tokens or 0) + (wasted_tokens or 0)
    if wasted_tokens is not None and delivered_tokens is not None and generated > 0:
        share = wasted_tokens / generated
        w_busy = Figure(busy * share, "GPU-s", both, rule) if busy is not None else _unknown("GPU-s")
        w_energy = Figure(energy * share, "J", both, rule) if energy is not None else _unknown("J")
    else:
        w_busy = _unknown("GPU-s", "needs wasted tokens (server truth)")
        w_energy = _unknown("J", "needs wasted tokens (server truth)")
    measured = _stop_to_idle(records, series, idle_pct, window_s)
    idles = [x for _, x in measured]
    dist: Distribution | None = distribution(idles)
    stop_note = f"Stop → all GPUs ≤ {idle_pct:g} % utilisation, stops with no other stream in flight"
    stop_source = f"{source} + client records"
    by_cell: dict[tuple[str, str], list[float]] = {}
    for r, x in measured:
        by_cell.setdefault((r.stack, r.close_mode), []).append(x)
    cells = tuple((stack, mode, Figure(len(xs), "stops", stop_source, stop_note),
                   Figure(distribution(xs), "s", stop_source, stop_note))
                  for (stack, mode), xs in sorted(by_cell.items()))
    return GpuFigures(
        gpu_busy_seconds=busy_f, energy=energy_f, mean_power=power_f, energy_per_delivered_token=per_token,
        wasted_gpu_seconds=w_busy, wasted_energy=w_energy,
        idle_stops=Figure(len(idles), "stops", stop_source, stop_note) if series else _unknown("stops"),
        stop_to_idle=Figure(dist, "s", stop_source, stop_note) if dist is not None
        else _unknown("s", "no stop left the GPU idle" if series else "no utilisation readings"),
        cells=cells,
        stop_to_idle_by_request={r.request_id: x for r, x in measured},
    )


def waste_share(g: GpuFigures, part_wasted: int | float | None, delivered_tokens: int | float | None,
                wasted_tokens: int | float | None) -> tuple[Figure, Figure]:
    """GPU-seconds and energy charged to `part_wasted` of the run's tokens (one stack × close mode, say), by the
    same rule as the run's waste: total × part ÷ (delivered + wasted)."""
    generated = (delivered_tokens or 0) + (wasted_tokens or 0)
    if part_wasted is None or delivered_tokens is None or wasted_tokens is None or generated <= 0:
        return _unknown("GPU-s", "needs wasted tokens (server truth)"), _unknown("J", "needs wasted tokens")
    share = part_wasted / generated
    busy, energy = g.gpu_busy_seconds.value, g.energy.value
    note = "share of the run's generated tokens"
    return (Figure(busy * share, "GPU-s", g.wasted_gpu_seconds.source, note) if isinstance(busy, int | float)
            else _unknown("GPU-s"),
            Figure(energy * share, "J", g.wasted_energy.source, note) if isinstance(energy, int | float)
            else _unknown("J"))


def timeline_rows(samples: Sequence[GpuSample], start: float) -> list[list[float | int | None]]:
    """The polled readings as rows of TIMELINE_COLUMNS; energy_j counts from each GPU's first reading."""
    first: dict[int, float] = {}
    rows: list[list[float | int | None]] = []
    for s in sorted(samples, key=lambda s: (s.t, s.gpu)):
        energy = None
        if s.energy_j is not None:
            base = first.setdefault(s.gpu, s.energy_j)
            energy = round(s.energy_j - base, 3)
        rows.append([round(s.t - start, 4), s.gpu, s.util_pct, s.power_w, energy, s.mem_used_bytes, s.sm_clock_mhz])
    return rows


@dataclass(frozen=True, slots=True)
class GpuCell:
    """One stack × close mode's GPU time and energy on wasted tokens, and its Stop → idle."""

    stack: str
    close_mode: str
    wasted_gpu_seconds: Figure
    wasted_energy: Figure
    idle_stops: Figure
    stop_to_idle: Figure


_CELL_FIGURES = ("wasted_gpu_seconds", "wasted_energy", "idle_stops", "stop_to_idle")
GPU_FIGURES = ("gpu_busy_seconds", "energy", "mean_power", "energy_per_delivered_token", "wasted_gpu_seconds",
               "wasted_energy", "idle_stops", "stop_to_idle")


@dataclass(frozen=True, slots=True)
class GpuSection:
    """What the GPU spent over the run and on tokens nobody read, and its timeline."""

    source: str  # "nvml" or "dcgm"
    devices: tuple[Mapping[str, Any], ...]
    interval_s: float
    idle_pct: float
    errors: int
    last_error: str | None
    timeline: Table
    util_samples: Table
    stop_marks_s: tuple[float, ...]
    stops: Table  # every Stop: t_s, stack, close_mode, request_id, stop_to_idle_s
    files: Mapping[str, str | None]  # timeline_csv, stops_csv, plot_png (None: matplotlib missing)
    figures: Mapping[str, Figure]  # GPU_FIGURES
    cells: tuple[GpuCell, ...]

    def figure(self, name: str) -> Figure:
        return self.figures.get(name) or Figure(None, "", UNAVAILABLE)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source, "devices": [dict(d) for d in self.devices], "interval_s": self.interval_s,
            "idle_pct": self.idle_pct, "errors": self.errors, "last_error": self.last_error,
            "timeline": self.timeline.to_json(), "util_samples": self.util_samples.to_json(),
            "stop_marks_s": list(self.stop_marks_s), "stops": self.stops.to_json(), "files": dict(self.files)}
        for name in GPU_FIGURES:
            out[name] = self.figure(name).to_json()
        out["cells"] = [{"stack": c.stack, "close_mode": c.close_mode,
                         **{n: getattr(c, n).to_json() for n in _CELL_FIGURES}} for c in self.cells]
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> GpuSection:
        return cls(
            source=str(doc.get("source", "")), devices=tuple(doc.get("devices") or ()),
            interval_s=float(doc.get("interval_s") or 0), idle_pct=float(doc.get("idle_pct") or 0),
            errors=int(doc.get("errors") or 0), last_error=doc.get("last_error"),
            timeline=Table.from_json(doc.get("timeline")), util_samples=Table.from_json(doc.get("util_samples")),
            stop_marks_s=tuple(doc.get("stop_marks_s") or ()), stops=Table.from_json(doc.get("stops")),
            files=dict(doc.get("files") or {}), figures={n: Figure.from_json(doc.get(n)) for n in GPU_FIGURES},
            cells=tuple(GpuCell(str(c.get("stack")), str(c.get("close_mode")),
                                *(Figure.from_json(c.get(n)) for n in _CELL_FIGURES))
                        for c in doc.get("cells") or ()),
        )


STOPS_COLUMNS = ("t_s", "stack", "close_mode", "request_id", "stop_to_idle_s")


def _gpu_cells(g: GpuFigures, cells: Sequence[Cell], delivered: float | None,
               wasted: float | None) -> tuple[GpuCell, ...]:
    """Per stack × close mode: the GPU time and energy its wasted tokens are charged, and its Stop → idle."""
    idle = {(stack, mode): (n, d) for stack, mode, n, d in g.cells}
    out = []
    for c in cells:
        cw = c.figures.wasted_tokens.value
        w_busy, w_energy = waste_share(g, cw if isinstance(cw, int | float) else None, delivered, wasted)
        n, d = idle.get((c.stack, c.close_mode), (None, None))
        if n is None or d is None:  # no stop of this cell left the GPU idle (or no utilisation at all)
            known = g.idle_stops.known
            n = Figure(0 if known else None, "stops", g.idle_stops.source, g.idle_stops.note)
            d = Figure(None, "s", UNAVAILABLE, "no stop of this cell left the GPU idle" if known else
                       g.stop_to_idle.note)
        out.append(GpuCell(c.stack, c.close_mode, w_busy, w_energy, n, d))
    return tuple(out)


def gpu_section(readings: GpuReadings, accounting: Accounting, records: Sequence[StreamRecord], start: float,
                end: float, files: Mapping[str, str | None], idle_pct: float = IDLE_PCT) -> GpuSection:
    """The report's `gpu` section: the run's GPU figures, per cell, and the timeline, from one source's readings.
    `files` names the CSV and plot files written beside the report (the report's GPU writer writes them)."""
    o = accounting.overall
    delivered = o.goodput_tokens.value if isinstance(o.goodput_tokens.value, int | float) else None
    wasted = o.wasted_tokens.value if isinstance(o.wasted_tokens.value, int | float) else None
    g = attribute(readings.samples, readings.util_samples, start, end, records, delivered, wasted, readings.source,
                  o.wasted_tokens.source, idle_pct=idle_pct, delivered_source=o.goodput_tokens.source)
    stops = [[round((r.stop or 0.0) - start, 4), r.stack, r.close_mode, r.request_id,
              None if (x := g.stop_to_idle_by_request.get(r.request_id)) is None else round(x, 4)]
             for r in sorted((r for r in records if r.stop is not None), key=lambda r: r.stop or 0.0)]
    return GpuSection(
        source=readings.name, devices=tuple(d.to_json() for d in readings.devices), interval_s=readings.interval,
        idle_pct=idle_pct, errors=readings.errors, last_error=readings.last_error,
        timeline=Table(TIMELINE_COLUMNS, timeline_rows(readings.samples, start)),
        util_samples=Table(("t_s", "gpu", "util_pct"),
                           [[round(u.t - start, 4), u.gpu, u.util_pct] for u in readings.util_samples]),
        stop_marks_s=tuple(round(m, 4) for m in stop_marks(records, start)),
        stops=Table(STOPS_COLUMNS, stops), files=dict(files), figures=dict(g.items()),
        cells=_gpu_cells(g, accounting.cells, delivered, wasted),
    )

"""The run's report as the console text a capacity planner reads, after Locust's own summary: first the verdict
(two to five sentences to paste, metrics/analysis/verdict.py), then one fixed summary block (requests and req/s,
output tok/s, goodput, TTFT/TPOT/ITL, queue wait: the same lines in the same order every run), then the abort
accounting per stack × close mode with the run-wide figures and their sources, the GPU's, and the
self-monitor's caveats. A writer over the Report: it computes nothing the Report does not hold.

Counts keep one meaning each: "aborted" is stopped streams the server aborted (the table's column); "ledger
aborts" is every abort the server made, the run's end's included; a stream nobody stopped is filed once, in
its stack's "not stopped" row."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping

from stopstorm.metrics.analysis.accounting import Accounting, Figures
from stopstorm.metrics.analysis.gpu_attribution import GpuSection
from stopstorm.metrics.analysis.verdict import Summary, Verdict
from stopstorm.metrics.figures import Distribution, Figure
from stopstorm.metrics.redact import redact
from stopstorm.metrics.report.model import GPU_ON_WORKER, MonitorSummary, Report

__all__ = [
    "BUSY_CPU_PCT",
    "CELL_COLUMNS",
    "TOO_MANY_FLAGGED",
    "cell_row",
    "format_accounting",
    "format_gpu",
    "format_report",
    "format_summary",
    "format_verdict",
    "ledger_abort_split",
    "self_monitor_warnings",
    "suggested_processes",
    "summary_rows",
]


def _num(f: Figure, scale: float = 1.0, digits: int = 0) -> str:
    if not isinstance(f.value, int | float):
        return "–"
    v = f.value * scale
    return f"{v:,.{digits}f}"


def _pct(f: Figure, which: str, scale: float = 1e3, digits: int = 1) -> str:
    if not isinstance(f.value, Distribution):
        return "–"
    return f"{getattr(f.value, which) * scale:,.{digits}f}"


CELL_COLUMNS = ("stack", "close mode", "streams", "stopped", "aborted", "abort p50 ms", "abort p99 ms",
            "wasted tok", "zombies", "zombie slot-s")


def cell_row(stack: str, mode: str, f: Figures) -> tuple[str, ...]:
    """One stack × close mode as the table shows it (console and HTML alike), `CELL_COLUMNS` in order."""
    return (stack, mode, _num(f.streams), _num(f.stopped), _num(f.aborted), _pct(f.abort_latency, "p50"),
            _pct(f.abort_latency, "p99"), _num(f.wasted_tokens), _num(f.zombies),
            _num(f.zombie_slot_seconds, digits=2))


def ledger_abort_split(accounting: Accounting) -> str:
    """Why the ledger's abort count is larger than the table's 'aborted': the streams nobody stopped that the
    server aborted too (the run's end cut them, they failed, or no stream reported them). "" without a ledger."""
    o, run = accounting.overall, accounting.run
    if not (isinstance(run.ledger_aborts.value, int) and isinstance(o.aborted.value, int)
            and o.aborted.source == run.ledger_aborts.source):
        return ""
    others = run.ledger_aborts.value - o.aborted.value
    return (f"ledger aborts: {run.ledger_aborts.value:,} = {o.aborted.value:,} of stopped streams (the table's "
            f"'aborted') + {others:,} of streams nobody stopped (cut by the run's end, failed or unreported)")


def format_accounting(accounting: Accounting, summary_lines: bool = True) -> str:
    """Per stack × close mode what Stop cost the server, then the run-wide figures, with their sources
    (`summary_lines`: also queue wait and goodput, which the summary block shows when there is one)."""
    rows = [CELL_COLUMNS] + [cell_row(c.stack, c.close_mode, c.figures) for c in accounting.cells]
    rows.append(cell_row("all", "all", accounting.overall))
    widths = [max(len(r[i]) for r in rows) for i in range(len(CELL_COLUMNS))]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))

    out = [line(rows[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows[1:-1]]
    out += ["  ".join("-" * w for w in widths), line(rows[-1]), ""]

    o, run = accounting.overall, accounting.run
    wasted_src = o.wasted_tokens.source + (f" ({o.wasted_tokens.note})" if o.wasted_tokens.note else "")
    qw = o.queue_wait
    out.append(f"truth: {', '.join(accounting.sources)}; aborted = stopped streams the server aborted; zombie = "
               f"stopped stream still holding a slot {accounting.zombie_grace_s:g} s after Stop")
    lat_src = o.abort_latency.source + (f" ({o.abort_latency.note})" if o.abort_latency.note else "")
    out.append(f"aborted: {o.aborted.source}; abort latency: {lat_src}; zombies, freed: {o.zombies.source}; "
               f"wasted tokens: {wasted_src}")
    if summary_lines:
        out.append(f"queue wait p50 / p95:   {_pct(qw, 'p50')} / {_pct(qw, 'p95')} ms  [{qw.source}]")
        out.append(f"goodput:                {_num(o.goodput_rate, digits=1)} tok/s ({_num(o.goodput_tokens)} tokens "
                   f"read in {_num(run.duration, digits=1)} s)  [{o.goodput_rate.source}]")
    if summary_lines:  # else the verdict says it
        out.append(f"freed by aborts:        {_num(o.freed_tokens)} tokens, {_num(o.freed_slot_seconds, digits=2)} "
                   f"slot-s ({_num(run.freed_tokens_rate, digits=1)} tok/s) vs every stopped stream run to its end  "
                   f"[{o.freed_tokens.source}]")
    split = ledger_abort_split(accounting)
    split = f"; {split}" if split else ""
    if run.blind_spot.known:
        out.append(f"vLLM blind spot:        {run.blind_spot.value}{split}  "
                   f"[{run.blind_spot.source} vs {run.vllm_counted_aborts.source}]")
    else:
        aborts = _num(run.ledger_aborts)
        out.append(f"vLLM blind spot:        {aborts} ledger aborts; vLLM's count unknown (no /metrics delta){split}"
                   if run.ledger_aborts.known else "vLLM blind spot:        unknown (needs the ledger and /metrics)")
    failed = o.failures.value
    if isinstance(failed, dict) and failed:
        out.append("failed streams:")
        out += [f"  {n:>6}  {text}" for text, n in sorted(failed.items(), key=lambda kv: -kv[1])]
    cut = o.interrupted.value
    if isinstance(cut, int) and cut:
        out.append(f"cut by the run's end:   {cut} stream{'s' if cut != 1 else ''} (recorded, not failures)")
    extra = [f"{name.replace('_', ' ')}: {_num(f)}" for name, f in (("unmatched_requests", run.unmatched_requests),
                                                                   ("unjoined_streams", run.unjoined_streams))
             if isinstance(f.value, int) and f.value]
    if extra:
        out.append("; ".join(extra))
    out += _ran_on_lines(accounting)
    if o.log_aborted.known and o.log_aborted.source != o.aborted.source:
        lat = o.log_abort_latency
        out.append(f"vLLM log:               {_num(o.log_aborted)} stopped streams' aborts logged; Stop → abort "
                   f"logged p50 / p99 {_pct(lat, 'p50')} / {_pct(lat, 'p99')} ms  [{o.log_aborted.source}]")
    return "\n".join(out)


def _ran_on_lines(accounting: Accounting) -> list[str]:
    """Missed closes (metrics/analysis/closes.py): the stopped streams whose close the server never acted on."""
    run, o = accounting.run, accounting.overall
    if not run.ran_on.known:
        return []
    lines = [f"ran on (missed closes): {run.ran_on.value}  [{run.ran_on.source}]"]
    if isinstance(o.ran_on.value, int) and o.ran_on.value:
        lines.append(f"{'':24}{_num(o.ran_on_tokens)} tokens unread, {_num(o.ran_on_slot_seconds, digits=2)} "
                     f"slot-s after Stop  [{o.ran_on_tokens.source}; slot-s: {o.ran_on_slot_seconds.source}]")
    return lines


def format_gpu(g: GpuSection) -> list[str]:
    """The GPU's lines: busy time and energy, what went on wasted tokens, Stop → idle per cell, its files."""
    def num(f: Figure, digits: int = 1) -> str:
        return f"{f.value:,.{digits}f}" if isinstance(f.value, int | float) else "–"

    source = "DCGM exporter" if g.source == "dcgm" else "NVML"
    n = len(g.devices)
    f = g.figure
    lines = [f"GPU ({source}, {n} GPU{'s' if n != 1 else ''}):",
             f"  busy:                 {num(f('gpu_busy_seconds'), 2)} GPU-s; energy {num(f('energy'))} J "
             f"(mean {num(f('mean_power'))} W)",
             f"  per delivered token:  {num(f('energy_per_delivered_token'), 3)} J",
             f"  on wasted tokens:     {num(f('wasted_gpu_seconds'), 2)} GPU-s, {num(f('wasted_energy'))} J  "
             f"[{f('wasted_energy').source}; by share of generated tokens]"]
    d = f("stop_to_idle").value
    if isinstance(d, Distribution):
        lines.append(f"  Stop → GPU idle:      p50 {d.p50 * 1e3:,.0f} ms, max {d.max * 1e3:,.0f} ms "
                     f"over {num(f('idle_stops'), 0)} stops that left it idle")
    else:
        lines.append(f"  Stop → GPU idle:      – ({f('stop_to_idle').note})")
    for c in g.cells:
        v = c.stop_to_idle.value
        if isinstance(v, Distribution):
            lines.append(f"    {c.stack:<13} {c.close_mode:<6} p50 {v.p50 * 1e3:,.0f} ms, max {v.max * 1e3:,.0f} ms "
                         f"({num(c.idle_stops, 0)} stops)")
    files = g.files
    plot = files.get("plot_png")
    lines.append(f"  timeline: {files.get('timeline_csv')}, stops: {files.get('stops_csv')}"
                 + (f", plot: {plot}" if plot else " (no plot: matplotlib cannot be imported)"))
    return lines


def self_monitor_warnings(summaries: Mapping[str, MonitorSummary]) -> list[str]:
    """Per process: the timing figures' error bar (how late its stamps can be, measured), then what it doubts:
    loops that lagged beyond their bound, CPU near one core, and when it carries too many streams to time."""
    lines = []
    for key, s in summaries.items():
        if s.ttft_checked and s.ttft_late_p99_ms is not None:
            itl = (f", ITL ≤ {s.itl_late_p99_ms:g} ms" if s.itl_checked and s.itl_late_p99_ms is not None else "")
            lines.append(f"{key}: TTFT stamps late by ≤ {s.ttft_late_p99_ms:g} ms at p99 (max "
                         f"{s.ttft_late_max_ms:g} ms){itl}; {s.ttft_flagged} of {s.ttft_checked} TTFTs and "
                         f"{s.itl_flagged} of {s.itl_checked} ITL gaps stamped while the loop was late by more than "
                         f"{s.max_loop_lag_ms:g} ms")
        if s.ttft_kernel or s.itl_kernel:
            lines.append(f"{key}: of those, {s.ttft_kernel} TTFTs and {s.itl_kernel} ITL gaps stamped by the kernel "
                         "as their bytes arrived (exact unless a late read took several chunks at once)")
        bad = []
        for name, st in (("hub lag", s.hub_lag), ("bridge lag", s.bridge_lag)):
            if st is not None and st.lagged:
                bad.append(f"{name} > {s.max_loop_lag_ms:g} ms {st.lagged} times (max {st.max_ms:g} ms)")
        if bad and s.gc_pause_max_ms > s.max_loop_lag_ms:
            bad.append(f"GC pauses up to {s.gc_pause_max_ms:g} ms ({s.gc_pause_total_s:g} s in all)")
        if s.cpu_pct is not None and s.cpu_pct >= 90:
            bad.append(f"CPU {s.cpu_pct:g} % of a core")
        if bad:
            lines.append(f"{key}: {'; '.join(bad)}")
        flagged = max(s.ttft_flagged / s.ttft_checked if s.ttft_checked else 0.0,
                      s.itl_flagged / s.itl_checked if s.itl_checked else 0.0)
        if flagged > TOO_MANY_FLAGGED and (s.cpu_pct is None or s.cpu_pct >= BUSY_CPU_PCT):
            lines.append(f"{key}: this process timed {100 * (1 - flagged):.0f} % of its stamps within "
                         f"{s.max_loop_lag_ms:g} ms: it carries too many streams; spread them over more processes "
                         f"(--processes {suggested_processes(s)})")
        elif flagged > TOO_MANY_FLAGGED:
            lines.append(f"{key}: this process timed {100 * (1 - flagged):.0f} % of its stamps within "
                         f"{s.max_loop_lag_ms:g} ms at {s.cpu_pct:g} % of a core: under half a core, its stalls "
                         "are most likely not its streams' load (start-up, a blocking call, the GC), so more "
                         "processes are not suggested")
    return lines


TOO_MANY_FLAGGED = 0.05  # more than this share of stamps taken on a late loop: the process carries too many streams
# ... but only when it was busy: a process under half a core whose loop stalls is stalled by something else (at
# 6 users the README's first run flagged 2 of 15 TTFTs, taken while the users' clients were built, at 16 % CPU,
# and was told to use --processes 2)
BUSY_CPU_PCT = 50.0


def suggested_processes(s: MonitorSummary) -> int:
    """Processes that would keep each under about half a core (its stamps on time), at least 2."""
    return max(2, math.ceil((s.cpu_pct or 100.0) / 50.0))


def _wrap(text: str, indent: str = "  ", width: int = 118) -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_on_hyphens=False)


def format_verdict(v: Verdict) -> list[str]:
    """The verdict's sentences, then its caveats, each wrapped and indented."""
    out: list[str] = []
    for sentence in (*v.sentences, *v.caveats):
        out += _wrap(sentence)
    return out


def _ms3(f: Figure, which: tuple[str, ...]) -> str:
    v = f.value
    if not isinstance(v, Distribution):
        return "–" + (f" ({f.note})" if f.note else "")
    return " / ".join(f"{getattr(v, w) * 1e3:,.1f}" for w in which) + f" ms (n {v.count:,})"


def summary_rows(s: Summary, accounting: Accounting) -> list[tuple[str, str, str]]:
    """The fixed block as (label, value in words, source): the console prints these lines, the HTML page this
    table, in this order every run, so a reader learns it once."""
    o, run = accounting.overall, accounting.run
    ran = ", ".join(s.stacks) or "none"
    planned = f"{len(s.stacks)} of {len(s.planned_stacks)} ran" if s.planned_stacks else f"{len(s.stacks)} ran"
    qw = o.queue_wait
    qn = f"; n {qw.value.count:,}" if isinstance(qw.value, Distribution) else ""
    return [
        ("requests", f"{_num(s.requests)} streams in {_num(run.duration, digits=1)} s = "
                     f"{_num(s.request_rate, digits=2)} req/s: {_num(o.stopped)} stopped, {_num(s.completed)} read to "
                     f"the end, {_num(o.interrupted)} cut by the run's end, {_num(o.failed)} failed",
         s.requests.source),
        ("client stacks", f"{planned}: {ran}", s.requests.source),
        ("output", f"{_num(s.output_rate, digits=1)} tok/s generated" if s.output_rate.known
         else "– (no server truth)", s.output_rate.source),
        ("goodput", f"{_num(o.goodput_rate, digits=1)} tok/s ({_num(o.goodput_tokens)} tokens read in "
                    f"{_num(run.duration, digits=1)} s)", o.goodput_rate.source),
        ("TTFT p50 / p99", _ms3(s.ttft, ("p50", "p99")), s.ttft.source),
        ("TPOT p50 / p99", _ms3(s.tpot, ("p50", "p99")), s.tpot.source),
        ("ITL p50 / p99", _ms3(s.itl, ("p50", "p99")), s.itl.source),
        ("queue wait p50 / p95", f"{_pct(qw, 'p50')} / {_pct(qw, 'p95')} ms (p99 {_pct(qw, 'p99')}{qn})", qw.source),
        ("engine step", f"{_num(s.step, 1e3, 1)} ms" + (f" ({s.step.note})" if s.step.note else ""), s.step.source),
    ]


def format_summary(s: Summary, accounting: Accounting) -> list[str]:
    """The fixed block's lines."""
    return [f"{label + ':':<24}{text}  [{source}]" for label, text, source in summary_rows(s, accounting)]


def format_report(report: Report, json_path: str | None = None, html_path: str | None = None) -> str:
    """Everything the console shows of a run, in order: a partial run says so first, then the verdict, the
    summary block, the accounting table, the GPU's and the self-monitor's lines."""
    out = []
    m = report.meta
    if m.partial:
        out.append(f"stopstorm: PARTIAL report ({m.partial_reason}): the figures cover the run until then\n")
    where = "; ".join(f"{k}: {v}" for k, v in (("JSON", json_path), ("HTML", html_path)) if v)
    if report.verdict is not None:
        out.append(f"stopstorm verdict{f' ({where})' if where else ''}")
        out += format_verdict(report.verdict)
        out.append("")
        where = ""
    if report.summary is not None:
        out.append("stopstorm summary")
        out += format_summary(report.summary, report.accounting)
        out.append("")
    out.append(f"stopstorm abort accounting per stack × close mode{f' ({where})' if where else ''}")
    out.append(format_accounting(report.accounting, summary_lines=report.summary is None))
    if report.gpu is not None:
        out += format_gpu(report.gpu)
    elif m.gpu_off == GPU_ON_WORKER:
        out.append(f"GPU: {m.gpu_off}; its timeline is written on that host")
    out += [f"stopstorm self-monitor: {line}" for line in self_monitor_warnings(report.self_monitor)]
    return redact("\n".join(out))  # no key, no password (metrics/redact.py)

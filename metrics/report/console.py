"""The run's abort accounting as the console table a capacity planner reads, after Locust's own summary."""

from __future__ import annotations

from stopstorm.metrics.analysis.accounting import Accounting, Figures
from stopstorm.metrics.figures import Distribution, Figure

__all__ = ["format_summary"]


def _num(f: Figure, scale: float = 1.0, digits: int = 0) -> str:
    if not isinstance(f.value, int | float):
        return "–"
    v = f.value * scale
    return f"{v:,.{digits}f}"


def _pct(f: Figure, which: str, scale: float = 1e3, digits: int = 1) -> str:
    if not isinstance(f.value, Distribution):
        return "–"
    return f"{getattr(f.value, which) * scale:,.{digits}f}"


_COLUMNS = ("stack", "close mode", "streams", "stopped", "aborted", "abort p50 ms", "abort p99 ms",
            "wasted tok", "zombies", "zombie slot-s")


def _row(stack: str, mode: str, f: Figures) -> tuple[str, ...]:
    return (stack, mode, _num(f.streams), _num(f.stopped), _num(f.aborted), _pct(f.abort_latency, "p50"),
            _pct(f.abort_latency, "p99"), _num(f.wasted_tokens), _num(f.zombies),
            _num(f.zombie_slot_seconds, digits=2))


def format_summary(accounting: Accounting) -> str:
    """Per stack × close mode what Stop cost the server, then the run-wide figures, with their sources."""
    rows = [_COLUMNS] + [_row(c.stack, c.close_mode, c.figures) for c in accounting.cells]
    rows.append(_row("all", "all", accounting.overall))
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))

    out = [line(rows[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows[1:-1]]
    out += ["  ".join("-" * w for w in widths), line(rows[-1]), ""]

    o, run = accounting.overall, accounting.run
    wasted_src = o.wasted_tokens.source + (f" ({o.wasted_tokens.note})" if o.wasted_tokens.note else "")
    qw = o.queue_wait
    out.append(f"truth: {', '.join(accounting.sources)}; zombie = stopped stream still holding a slot "
               f"{accounting.zombie_grace_s:g} s after Stop")
    lat_src = o.abort_latency.source + (f" ({o.abort_latency.note})" if o.abort_latency.note else "")
    out.append(f"aborted: {o.aborted.source}; abort latency: {lat_src}; zombies, freed: {o.zombies.source}; "
               f"wasted tokens: {wasted_src}")
    out.append(f"queue wait p50 / p95:   {_pct(qw, 'p50')} / {_pct(qw, 'p95')} ms  [{qw.source}]")
    out.append(f"goodput:                {_num(o.goodput_rate, digits=1)} tok/s "
               f"({_num(o.goodput_tokens)} tokens read in {_num(run.duration, digits=1)} s)  [{o.goodput_rate.source}]")
    out.append(f"freed by aborts:        {_num(o.freed_tokens)} tokens, {_num(o.freed_slot_seconds, digits=2)} "
               f"slot-s ({_num(run.freed_tokens_rate, digits=1)} tok/s) vs every stopped stream run to its end  "
               f"[{o.freed_tokens.source}]")
    if run.blind_spot.known:
        out.append(f"vLLM blind spot:        {run.blind_spot.value}  "
                   f"[{run.blind_spot.source} vs {run.vllm_counted_aborts.source}]")
    else:
        aborts = _num(run.ledger_aborts)
        out.append(f"vLLM blind spot:        {aborts} aborts in the ledger; vLLM's count unknown (no /metrics delta)"
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
    if o.log_aborted.known and o.log_aborted.source != o.aborted.source:
        lat = o.log_abort_latency
        out.append(f"vLLM log:               {_num(o.log_aborted)} stopped streams' aborts logged; Stop → abort "
                   f"logged p50 / p99 {_pct(lat, 'p50')} / {_pct(lat, 'p99')} ms  [{o.log_aborted.source}]")
    return "\n".join(out)

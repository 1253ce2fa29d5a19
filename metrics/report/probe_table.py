"""The stop-semantics probe's table, its progress lines and its verdict: per client stack × close mode × stop
point, what the server really did after Stop, then the same in words.

Writers over the probe's cells (metrics/analysis/probe.py): they compute nothing the cells do not hold.
"""

from __future__ import annotations

from collections.abc import Sequence

from stopstorm.metrics.analysis.probe import ProbeCell

__all__ = ["format_progress", "format_table", "probe_verdict", "stop_words"]

_SDK = {"openai": "openai SDK (sync)", "openai-async": "openai SDK (async)"}


def stop_words(stop: str) -> str:
    """A row's stop point as a person says it: "after 20 tokens", "10 ms after send", "at the first token"."""
    kind, _, arg = stop.partition(":")
    if stop == "first-token":
        return "at the first token"
    if kind == "tokens" and arg:
        return f"after {arg} tokens"
    if kind == "seconds" and arg:
        try:
            return f"{float(arg) * 1e3:g} ms after send"
        except ValueError:
            pass
    return stop or "–"


def _show(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def format_table(cells: Sequence[ProbeCell]) -> str:
    """A markdown table a human reads in a terminal or a README."""
    head = ("| stack | close mode | stop | streams | aborted | ran on | never reached | stop→freed p50 ms | "
            "stop→freed max ms | stop→close seen p50 ms | wasted tokens (mean) | outcome |")
    rows = [head, "|" + "---|" * 12]
    for c in cells:
        rows.append(f"| {c.stack} | {c.close_mode} | {stop_words(c.stop)} | {c.streams} | {c.aborted} | {c.ran_on} | "
                    f"{c.never_reached} | {_show(c.abort_latency_ms_p50)} | {_show(c.abort_latency_ms_max)} | "
                    f"{_show(c.close_seen_ms_p50)} | {_show(c.wasted_tokens_mean)} | "
                    f"{c.outcome}{f' ({c.failed} failed)' if c.failed else ''} |")
    return "\n".join(rows)


def format_progress(cell: ProbeCell, done: int, total: int) -> str:
    """One line as each cell finishes, while the probe runs."""
    lat = (f", stop→freed p50 {cell.abort_latency_ms_p50:g} ms" if cell.abort_latency_ms_p50 is not None else "")
    wasted = f", {cell.wasted_tokens_mean:g} tokens wasted a stream" if cell.wasted_tokens_mean is not None else ""
    return (f"probe cell {done}/{total}: {cell.stack} {cell.close_mode} {stop_words(cell.stop)}: {cell.outcome} "
            f"({cell.streams} stream{'s' if cell.streams != 1 else ''}{lat}{wasted})")


def _names(stacks: Sequence[str]) -> str:
    """Stacks as a reader names them: both openai stacks are "openai SDK, sync and async"."""
    stacks = list(dict.fromkeys(stacks))
    if "openai" in stacks and "openai-async" in stacks:
        rest = [s for s in stacks if s not in ("openai", "openai-async")]
        return ", ".join(["openai SDK, sync and async", *rest])
    return ", ".join(_SDK.get(s, s) for s in stacks)


def _span(values: Sequence[float], fmt: str) -> str:
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}–{hi}"


def _runs_on(c: ProbeCell) -> bool:
    """The server kept generating for a stopped stream of this cell: a missed close, or never closed."""
    settled = c.streams - c.failed
    return c.ran_on > 0 or (c.aborted + c.never_reached < settled and c.close_mode != "none")


def probe_verdict(cells: Sequence[ProbeCell]) -> list[str]:
    """The probe's findings in words, one line per close mode and stop point (what a reader does next)."""
    groups: dict[tuple[str, str], list[ProbeCell]] = {}
    for c in cells:
        groups.setdefault((c.close_mode, c.stop), []).append(c)
    lines = []
    for (mode, stop), group in groups.items():
        at = stop_words(stop)
        bad = [c for c in group if _runs_on(c)]
        good = [c for c in group if not _runs_on(c)]
        if group[0].early:
            closed = sum(c.streams - c.failed for c in group)
            reached = closed - sum(c.never_reached for c in group)
            ran = sum(c.ran_on for c in group)
            line = (f"an early `{mode}` ({at}): {ran} of {reached} requests the server registered ran on "
                    f"({100.0 * ran / reached:.0f} %)" if reached else f"an early `{mode}` ({at}): no request reached "
                    "the engine")
            if bad:
                line += " — " + "; ".join(f"{_names([c.stack])} {c.ran_on}/{c.streams - c.failed - c.never_reached}"
                                          for c in bad)
            never = closed - reached
            if never:
                line += f"; {never} of {closed} closed before the engine registered them (no work)"
            lines.append(line)
            continue
        if mode == "none":
            lines.append(f"`none` ({at}): the client reads on, so the server generates every token nobody reads")
            continue
        if mode == "hold":
            late = [c.abort_latency_ms_p50 for c in good if c.abort_latency_ms_p50 is not None]
            wasted = [c.wasted_tokens_mean for c in group if c.wasted_tokens_mean is not None]
            line = "`hold` (socket kept open, nothing read) is never noticed while held: the server generates on"
            if late:
                line += f" until the socket closes (stop→freed p50 {_span(late, ',.0f')} ms)"
            if wasted:
                line += f", {_span(wasted, 'g')} tokens wasted a stream"
            if bad:
                line += f"; ran to the end during the hold for {_names([c.stack for c in bad])}"
            lines.append(line)
            continue
        lat = [c.abort_latency_ms_max for c in good if c.abort_latency_ms_max is not None]
        if good:
            who = "every stack" if not bad else _names([c.stack for c in good])
            lines.append(f"`{mode}` ({at}) frees the slot for {who}"
                         + (f" (stop→freed at most {max(lat):g} ms)" if lat else ""))
        if bad:
            never_closed = all(c.aborted == 0 for c in bad)
            what = ("never closes the stream — call `close()`" if mode == "drop" and never_closed
                    else f"left {sum(c.ran_on for c in bad)} of {sum(c.streams - c.failed for c in bad)} streams "
                    "running to their end")
            lines.append(f"{_names([c.stack for c in bad])}: `{mode}` {what}")
    return lines

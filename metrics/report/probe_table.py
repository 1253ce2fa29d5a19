"""The stop-semantics probe's table: per client stack × close mode, what the server really did after Stop."""

from __future__ import annotations

from stopstorm.metrics.analysis.probe import ProbeCell

__all__ = ["format_table"]

def format_table(cells: list[ProbeCell]) -> str:
    """A markdown table a human reads in a terminal or a README."""

    def show(value: float | None) -> str:
        return "–" if value is None else f"{value:g}"

    head = ("| stack | close mode | streams | aborted | stop→freed p50 ms | stop→freed max ms | "
            "stop→close seen p50 ms | wasted tokens (mean) | outcome |")
    rows = [head, "|" + "---|" * 9]
    for c in cells:
        rows.append(f"| {c.stack} | {c.close_mode} | {c.streams} | {c.aborted} | {show(c.abort_latency_ms_p50)} | "
                    f"{show(c.abort_latency_ms_max)} | {show(c.close_seen_ms_p50)} | {show(c.wasted_tokens_mean)} | "
                    f"{c.outcome}{f' ({c.failed} failed)' if c.failed else ''} |")
    return "\n".join(rows)

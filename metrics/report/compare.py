"""Scenarios side by side: `stopstorm compare a.json b.json … [--replay] [--html out.html]`.

A capacity planner's question is a difference ("what do prompt aborts save against zombies, or against no
stops?"), so each figure is shown per scenario with its delta against the first (the baseline), and queue wait
as "saved" (baseline minus scenario: positive is better). Inputs are stopstorm report JSONs
(metrics/report/document.py). With `--replay`, a report's `capacity.replay` counterfactuals (perfect aborts, no
stops) join as scenarios of their own, so one run answers the question without a second run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from stopstorm.metrics.figures import distribution

__all__ = ["FIGURES", "format_table", "load_scenarios", "scenario_figures"]

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
    ("energy_per_delivered_token", "energy per delivered token (J)", 4),
)
_LOWER_IS_BETTER = {"queue_wait_p50", "queue_wait_p95", "queue_wait_p99", "ttft_p50", "ttft_p95",
                    "wasted_tokens", "zombie_slot_seconds", "energy_per_delivered_token"}


def _fig(doc: Mapping[str, Any], name: str, key: str | None = None) -> float | None:
    f = ((doc.get("overall") or {}).get("figures") or {}).get(name) or {}
    v = f.get("value")
    if key is not None:
        v = v.get(key) if isinstance(v, dict) else None
    return float(v) if isinstance(v, int | float) else None


def _energy_j(doc: Mapping[str, Any]) -> float | None:
    """Energy the GPUs used over the run: the `gpu` section's `energy` FIGURE (Δ of the driver's counter over
    the run, metrics/analysis/gpu_attribution.py), else Δ energy_j per GPU over its timeline."""
    gpu = doc.get("gpu") or {}
    total = gpu.get("energy")
    if isinstance(total, dict):
        total = total.get("value")
    if isinstance(total, int | float):
        return float(total)
    tl = gpu.get("timeline") or {}
    cols, rows = tl.get("columns") or [], tl.get("rows") or []
    if "energy_j" not in cols or not rows:
        return None
    ie, ig = cols.index("energy_j"), cols.index("gpu") if "gpu" in cols else None
    per_gpu: dict[Any, list[float]] = {}
    for r in rows:
        if r[ie] is not None:
            per_gpu.setdefault(r[ig] if ig is not None else 0, []).append(float(r[ie]))
    return sum(max(v) - min(v) for v in per_gpu.values()) if per_gpu else None


def scenario_figures(doc: Mapping[str, Any]) -> dict[str, float | None]:
    """The compared figures of one report (None where the report lacks the truth for one)."""
    cap = doc.get("capacity") or {}
    ttft = (cap.get("ttft") or {}).get("value") or {}
    tput = (cap.get("throughput") or {}).get("value")
    delivered = _fig(doc, "goodput_tokens")
    energy = _energy_j(doc)
    # Every request the server queued (the ledger's samples, the replay's population too), not only the
    # streams whose users reported before the run ended; the accounting's figure where there are no samples.
    qw = distribution(cap.get("queue_wait_samples_s") or [])
    return {
        "queue_wait_p50": qw.p50 if qw else _fig(doc, "queue_wait", "p50"),
        "queue_wait_p95": qw.p95 if qw else _fig(doc, "queue_wait", "p95"),
        "queue_wait_p99": qw.p99 if qw else _fig(doc, "queue_wait", "p99"),
        "ttft_p50": ttft.get("p50"),
        "ttft_p95": ttft.get("p95"),
        "throughput": float(tput) if isinstance(tput, int | float) else None,
        "goodput": _fig(doc, "goodput_rate"),
        "wasted_tokens": _fig(doc, "wasted_tokens"),
        "zombie_slot_seconds": _fig(doc, "zombie_slot_seconds"),
        "energy_per_delivered_token": energy / delivered if energy is not None and delivered else None,
    }


def _replay_scenario(doc: Mapping[str, Any], label: str, policy: str) -> dict[str, Any] | None:
    """A report-shaped document for one replay policy, so it compares like a run."""
    r = (((doc.get("capacity") or {}).get("replay") or {}).get("policies") or {}).get(policy)
    if not r:
        return None
    qw = r.get("queue_wait") or {}
    return {
        "_label": f"{label} (replay: {policy})",
        "meta": doc.get("meta") or {},
        "sources": ["replay of the simulator ledger"],
        "overall": {"figures": {
            "queue_wait": {"value": qw}, "goodput_rate": {"value": r.get("goodput_tok_s")},
            "wasted_tokens": {"value": r.get("wasted_tokens")},
            "zombie_slot_seconds": {"value": 0.0 if policy == "perfect" else None}}},
        "capacity": {"ttft": {"value": r.get("ttft")}, "throughput": {"value": r.get("throughput_tok_s")}},
    }


def load_scenarios(paths: Sequence[str], with_replay: bool = False) -> list[dict[str, Any]]:
    """The reports, each labelled by its file name (or `meta.scenario`); with replay scenarios if asked."""
    docs: list[dict[str, Any]] = []
    for p in paths:
        try:
            doc = orjson.loads(Path(p).read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise SystemExit(f"stopstorm compare: cannot read report {p}: {exc}") from None
        if not isinstance(doc, dict) or "overall" not in doc:
            raise SystemExit(f"stopstorm compare: {p} is not a stopstorm report (no 'overall' section)")
        label = str((doc.get("meta") or {}).get("scenario") or Path(p).stem)
        doc["_label"] = label
        docs.append(doc)
        if with_replay:
            docs += [s for pol in ("perfect", "full") if (s := _replay_scenario(doc, label, pol))]
    return docs


def _delta(key: str, base: float | None, v: float | None, digits: int) -> str:
    if base is None or v is None:
        return ""
    d = v - base
    text = f"saved {-d:+,.{digits}f}" if key.startswith("queue_wait") else f"{d:+,.{digits}f}"
    if base:
        text += f" ({d / base * 100:+.0f} %)"
    return text


def format_table(docs: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table: one row per figure, one column per scenario, deltas against the first."""
    values = [scenario_figures(d) for d in docs]
    labels = [str(d.get("_label") or f"run {i + 1}") for i, d in enumerate(docs)]
    head = ["figure", f"{labels[0]} (baseline)", *labels[1:]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(labels)]
    for key, label, digits in FIGURES:
        base = values[0].get(key)
        cells = ["–" if base is None else f"{base:,.{digits}f}"]
        for v in values[1:]:
            x = v.get(key)
            cells.append("–" if x is None else f"{x:,.{digits}f} {_delta(key, base, x, digits)}".strip())
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Deltas are against the baseline; queue wait 'saved' is baseline minus scenario (positive: "
                 "shorter waits). '–': the report lacks that truth.")
    return "\n".join(lines)

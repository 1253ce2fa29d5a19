"""One client's stamps against the simulator's ledger: where a reported TTFT's time really went.

Every tool (stopstorm's stacks, AIPerf, GuideLLM) is reduced to the same three client stamps per request, on
the host's CLOCK_MONOTONIC (`time.monotonic()`; Python's `perf_counter` is the same clock on Linux, and a
wall-clock stamp is converted with `wall_to_monotonic`), joined by request id with the ledger of a simulator
started with `--ledger-send-times`:

- `send`: when the tool says the request was sent (the start of its TTFT);
- `first`: when it saw the first token (the end of its TTFT);
- `reported_ttft`: the TTFT the tool itself reports (usually `first - send`; kept apart so a tool whose
  figure is computed some other way is shown as it reports it).

From these and the ledger (`arrival` when the server's handler got the request, `first_sent` just before the
first token's chunk was written; both CLOCK_MONOTONIC in the simulator's process):

    reported TTFT = ingress + true TTFT + delivery
    ingress  = arrival    - send        the tool's own queueing before the write, plus the trip in
    true     = first_sent - arrival     what the server took (the truth a TTFT should report)
    delivery = first      - first_sent  the trip back plus how late the tool read and stamped it

Pure functions only: no I/O, no clocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["ClientStamp", "chunk_delivery", "join", "pct", "summary", "wall_to_monotonic"]

ClientStamp = dict[str, Any]  # {"id": ledger request id, "send": s, "first": s, "reported_ttft": s}
FIGURES = ("reported", "true", "delivery", "ingress")


def wall_to_monotonic(wall: float, ledger_doc: Mapping[str, Any]) -> float:
    """A `time.time()` stamp on the ledger's monotonic clock, through the offset the simulator took once
    (CLOCK_REALTIME − CLOCK_MONOTONIC is one system-wide offset; it moves only if the clock is stepped or
    slewed, which a run of seconds does not see at the resolution here)."""
    return wall - float(ledger_doc["epoch_offset"])


def pct(values: Sequence[float], p: float) -> float | None:
    """The p-quantile (0-1) by nearest rank on the sorted values; None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]


def join(stamps: Iterable[ClientStamp], ledger: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per figure, the list of values (seconds) over the requests both sides know; and how many did not join."""
    out: dict[str, Any] = {name: [] for name in FIGURES}
    out["unjoined"] = 0
    out["joined_ids"] = []
    for s in stamps:
        e = ledger.get(s["id"])
        if e is None or e.get("first_sent") is None or s.get("first") is None or s.get("send") is None:
            out["unjoined"] += 1
            continue
        out["joined_ids"].append(s["id"])
        out["reported"].append(s["reported_ttft"] if s.get("reported_ttft") is not None else s["first"] - s["send"])
        out["true"].append(e["first_sent"] - e["arrival"])
        out["delivery"].append(s["first"] - e["first_sent"])
        out["ingress"].append(e["arrival"] - s["send"])
    return out


def chunk_delivery(chunks: Iterable[tuple[str, Sequence[float], Sequence[int]]],
                   ledger: Mapping[str, Mapping[str, Any]]) -> list[float]:
    """Every token-carrying chunk's client stamp minus the send time of the server chunk that brought the
    same running token count (continuous usage gives the count), over (id, chunk_times, chunk_tokens)."""
    out: list[float] = []
    for rid, times, tokens in chunks:
        e = ledger.get(rid)
        if e is None:
            continue
        sent_at = {int(n): t for t, n in e.get("send_times") or []}
        for t, n in zip(times, tokens, strict=True):
            s = sent_at.get(int(n))
            if s is not None:
                out.append(t - s)
    return out


def summary(joined: Mapping[str, Any], ps: Sequence[float] = (0.5, 0.99)) -> dict[str, Any]:
    """p50/p99 (ms) of each figure, and the counts."""
    out: dict[str, Any] = {"joined": len(joined["reported"]), "unjoined": joined["unjoined"]}
    for name in FIGURES:
        for p in ps:
            v = pct(joined[name], p)
            out[f"{name}_p{round(p * 100)}_ms"] = None if v is None else round(v * 1e3, 3)
    return out

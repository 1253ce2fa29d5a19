"""The simulator's fault grammar: one spec language for `--fault SPEC` (drawn per request at a rate) and for the
per-request `x-stopstorm-fault: SPEC` header, so a test and a load run inject exactly the same faults.

A spec is `KIND[:ARG[:ARG]][@RATE]`; RATE (default 1) is the chance a request gets this fault, used only by
`--fault` (a header always applies). Kinds:

- `status:CODE`: the request is refused with CODE (400, 429, 500 or 503) and vLLM's error body, no stream;
- `error-after:N`: after N tokens, vLLM's mid-stream `data: {"error": …}` event, then `[DONE]`;
- `reset-after:N`: after N tokens the server drops the connection without ending the response (no `[DONE]`,
  no last chunk), as a crashed worker or a proxy cutting the stream does;
- `stall-after:N:SECONDS`: after N tokens, no byte for SECONDS, then the stream goes on;
- `slow-headers:SECONDS`: the response headers wait SECONDS;
- `malformed:SHAPE[:N]`: after N tokens (default 1) one odd event: `not-json` and `missing-fields` are broken
  chunks a client must count as failures; `crlf` (CRLF line ends), `no-space` (`data:` without the space) and
  `comments` (`: comment` and keep-alive blank lines) are valid SSE a client must read without failing;
- `empty`: 200 and the event-stream headers, then the body ends with no event at all.

Every request that gets a fault has the spec in its ledger entry (`fault`), so truth says what was injected.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["FAULT_KINDS", "MALFORMED_SHAPES", "STATUS_CODES", "Fault", "FaultPlan", "parse_fault"]

STATUS_CODES = (400, 429, 500, 503)
MALFORMED_SHAPES = ("not-json", "missing-fields", "crlf", "no-space", "comments")
FAULT_KINDS = ("status:CODE", "error-after:N", "reset-after:N", "stall-after:N:SECONDS", "slow-headers:SECONDS",
               "malformed:SHAPE[:N]", "empty")
_GRAMMAR = f"KIND[:ARG][@RATE] with KIND one of {', '.join(FAULT_KINDS)}"


@dataclass(frozen=True, slots=True)
class Fault:
    """One parsed fault; `after` counts tokens, `seconds` is a stall or header delay."""

    kind: str
    spec: str  # as written, without the rate: what the ledger records
    rate: float = 1.0
    code: int | None = None
    after: int | None = None
    seconds: float | None = None
    shape: str | None = None


def _tokens(text: str, spec: str) -> int:
    if not text.isdigit():
        raise ValueError(f"fault {spec!r}: token count must be a whole number >= 0, got {text!r}")
    return int(text)


def _seconds(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"fault {spec!r}: seconds must be a number >= 0, got {text!r}")
    return value


def parse_fault(text: str) -> Fault:
    """Parse one spec; ValueError says what is wrong and lists the grammar."""
    spec, _, rate_text = text.strip().partition("@")
    rate = 1.0
    if rate_text:
        try:
            rate = float(rate_text)
        except ValueError:
            rate = -1.0
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault {text!r}: rate must be a probability in [0, 1], got {rate_text!r}")
    kind, *args = spec.split(":")
    n = len(args)
    if kind == "status" and n == 1:
        if not args[0].isdigit() or int(args[0]) not in STATUS_CODES:
            raise ValueError(f"fault {spec!r}: status must be one of {', '.join(map(str, STATUS_CODES))}")
        return Fault(kind, spec, rate, code=int(args[0]))
    if kind in ("error-after", "reset-after") and n == 1:
        return Fault(kind, spec, rate, after=_tokens(args[0], spec))
    if kind == "stall-after" and n == 2:
        return Fault(kind, spec, rate, after=_tokens(args[0], spec), seconds=_seconds(args[1], spec))
    if kind == "slow-headers" and n == 1:
        return Fault(kind, spec, rate, seconds=_seconds(args[0], spec))
    if kind == "malformed" and n in (1, 2):
        if args[0] not in MALFORMED_SHAPES:
            raise ValueError(f"fault {spec!r}: malformed shape must be one of {', '.join(MALFORMED_SHAPES)}")
        return Fault(kind, spec, rate, shape=args[0], after=_tokens(args[1], spec) if n == 2 else 1)
    if kind == "empty" and n == 0:
        return Fault(kind, spec, rate)
    raise ValueError(f"unknown fault {text!r}; expected {_GRAMMAR}")


class FaultPlan:
    """The `--fault` specs of one simulator, drawn per request from their own seeded generator (so faults
    never shift the output-length draws a seed fixes)."""

    def __init__(self, faults: Sequence[Fault], seed: int = 0) -> None:
        total = sum(f.rate for f in faults)
        if total > 1.0 + 1e-9:
            raise ValueError(f"--fault rates add up to {total:g}; at most 1 (one fault per request)")
        self.faults = tuple(faults)
        self._rng = random.Random(f"faults:{seed}")

    def draw(self) -> Fault | None:
        if not self.faults:
            return None
        u = self._rng.random()
        for fault in self.faults:
            if u < fault.rate:
                return fault
            u -= fault.rate
        return None

    def __str__(self) -> str:
        return ",".join(f"{f.spec}@{f.rate:g}" for f in self.faults) or "none"

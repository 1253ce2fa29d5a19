"""Output-length distributions: how many tokens a request generates before EOS when EOS is allowed.

Kept apart from the engine so the same parser serves the simulator's flags and, later, the users' stop policy.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["LengthDistribution"]

_KINDS = {"fixed": 1, "uniform": 2, "exponential": 1}


@dataclass(frozen=True, slots=True)
class LengthDistribution:
    """`fixed:N`, `uniform:A:B` (inclusive) or `exponential:MEAN`; every draw is at least 1."""

    kind: str
    params: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> LengthDistribution:
        kind, _, rest = text.strip().partition(":")
        if kind not in _KINDS:
            raise ValueError(f"unknown length distribution {text!r}: use fixed:N, uniform:A:B or exponential:MEAN")
        try:
            params = tuple(float(p) for p in rest.split(":")) if rest else ()
        except ValueError:
            raise ValueError(f"length distribution {text!r} has a parameter that is not a number") from None
        if len(params) != _KINDS[kind]:
            raise ValueError(f"length distribution {kind} takes {_KINDS[kind]} parameter(s), got {text!r}")
        if any(p < 0 or not math.isfinite(p) for p in params):
            raise ValueError(f"length distribution {text!r} needs finite parameters >= 0")
        if kind == "uniform" and params[0] > params[1]:
            raise ValueError(f"length distribution {text!r}: A must not exceed B")
        return cls(kind, params)

    def draw(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            value = self.params[0]
        elif self.kind == "uniform":
            value = rng.randint(int(self.params[0]), int(self.params[1]))
        else:
            value = rng.expovariate(1.0 / self.params[0]) if self.params[0] > 0 else 1
        return max(1, round(value))

    def __str__(self) -> str:
        return ":".join([self.kind, *(f"{p:g}" for p in self.params)])

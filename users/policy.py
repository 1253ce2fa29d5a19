"""When a simulated user presses Stop, and what their client does then.

A `StopPolicy` draws one `StopPlan` per stream; a `CloseMix` draws the close mode. Both parse the strings
given on the command line and refuse bad ones with a message naming the allowed forms.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from stopstorm.distributions import LengthDistribution

__all__ = ["CLOSE_MODES", "CloseMix", "StopPlan", "StopPolicy"]

CLOSE_MODES = ("close", "drop", "hold", "none")
_STOP_FORMS = "tokens:<dist>, seconds:<dist> or first-token, where <dist> is fixed:N, uniform:A:B or exponential:MEAN"


@dataclass(frozen=True, slots=True)
class StopPlan:
    """One stream's Stop: after `tokens` tokens, after `seconds` from send, at the first token, or never."""

    tokens: int | None = None
    seconds: float | None = None
    first_token: bool = False

    @property
    def never(self) -> bool:
        return self.tokens is None and self.seconds is None and not self.first_token

    def __str__(self) -> str:
        if self.first_token:
            return "first-token"
        if self.tokens is not None:
            return f"tokens:{self.tokens}"
        if self.seconds is not None:
            return f"seconds:{self.seconds:.3f}"
        return "never"


@dataclass(frozen=True, slots=True)
class StopPolicy:
    """Stop with `probability`; where, by `spec` (see `_STOP_FORMS`)."""

    probability: float
    kind: str  # tokens, seconds or first-token
    distribution: LengthDistribution | None

    @classmethod
    def parse(cls, probability: float, spec: str) -> StopPolicy:
        if not (isinstance(probability, int | float) and 0.0 <= probability <= 1.0):
            raise ValueError(f"--stop-probability must be within [0, 1], got {probability}")
        kind, _, rest = spec.strip().partition(":")
        if kind == "first-token" and not rest:
            return cls(probability, kind, None)
        if kind not in ("tokens", "seconds") or not rest:
            raise ValueError(f"--stop-at {spec!r}: use {_STOP_FORMS}")
        try:
            dist = LengthDistribution.parse(rest)
        except ValueError as exc:
            raise ValueError(f"--stop-at {spec!r}: {exc}") from None
        return cls(probability, kind, dist)

    def draw(self, rng: random.Random) -> StopPlan:
        if self.probability <= 0 or rng.random() >= self.probability:
            return StopPlan()
        if self.kind == "first-token":
            return StopPlan(first_token=True)
        assert self.distribution is not None
        if self.kind == "tokens":
            return StopPlan(tokens=self.distribution.draw(rng))
        return StopPlan(seconds=self._draw_seconds(rng))

    def _draw_seconds(self, rng: random.Random) -> float:
        """Seconds are continuous: draw without the integer rounding token counts get."""
        dist = self.distribution
        assert dist is not None
        if dist.kind == "fixed":
            return dist.params[0]
        if dist.kind == "uniform":
            return rng.uniform(dist.params[0], dist.params[1])
        return rng.expovariate(1.0 / dist.params[0]) if dist.params[0] > 0 else 0.0


@dataclass(frozen=True, slots=True)
class CloseMix:
    """Weighted close modes, e.g. `close:2,drop:1,hold:1`; a bare `close` means close only."""

    modes: tuple[str, ...]
    weights: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> CloseMix:
        modes, weights = [], []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            mode, _, weight = part.partition(":")
            if mode not in CLOSE_MODES:
                raise ValueError(f"--close-mix: unknown close mode {mode!r}; choose from {', '.join(CLOSE_MODES)}")
            try:
                w = float(weight) if weight else 1.0
            except ValueError:
                raise ValueError(f"--close-mix: weight of {mode} is not a number: {weight!r}") from None
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"--close-mix: weight of {mode} must be a finite number >= 0, got {weight}")
            modes.append(mode)
            weights.append(w)
        if not modes or sum(weights) <= 0:
            raise ValueError(f"--close-mix {spec!r}: give at least one mode with a positive weight, "
                             "e.g. close:2,drop:1,hold:1")
        return cls(tuple(modes), tuple(weights))

    def draw(self, rng: random.Random) -> str:
        if len(self.modes) == 1:
            return self.modes[0]
        return rng.choices(self.modes, self.weights)[0]

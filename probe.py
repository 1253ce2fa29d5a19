"""Locustfile for the stop-semantics probe: `locust -f probe.py --headless -u 1 --ignore-eos --max-tokens 200`.

Kept apart from locustfile.py because the probe ends the run by itself when it has walked its matrix, which
must never happen to a load test that merely forgot to name its user classes.
"""

from locust import run_single_user

import stopstorm.metrics.plugin.hooks  # noqa: F401  (stopstorm's options and event hooks: the report, GPU, simulator…)
from stopstorm.users.probe import StopProbeUser

__all__ = ["StopProbeUser"]

if __name__ == "__main__":
    run_single_user(StopProbeUser)

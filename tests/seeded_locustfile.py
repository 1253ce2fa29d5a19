"""A locustfile for the distributed tests: seeded, bounded work that is the same whatever process runs it.

Every user draws its prompts, stop plans and close modes from its own `random.Random(SEED)`, so each user does
the same `ITERATIONS` streams, and U users do the same work in one process or spread over workers. After its
streams a user idles until the run's time limit ends it, so no stream is cut off by the end of the run and
every request in the simulator's ledger has its record.
"""

from __future__ import annotations

import os
import random

import gevent

import stopstorm.metrics.plugin.hooks  # noqa: F401  (stopstorm's options and hooks, as in the real locustfile)
from stopstorm.users import stack_requests  # the module, not the class: Locust would run every User class in sight

__all__ = ["ITERATIONS", "SEED", "SeededRequestsUser"]

SEED = int(os.environ.get("STOPSTORM_TEST_SEED", "10"))
ITERATIONS = int(os.environ.get("STOPSTORM_TEST_ITERATIONS", "3"))


class SeededRequestsUser(stack_requests.RequestsUser):
    def on_start(self) -> None:
        super().on_start()
        self.rng = random.Random(SEED)
        self.left = ITERATIONS

    def bounded_stream(self) -> None:
        if self.left <= 0:
            gevent.sleep(0.5)  # done: idle until the run's time limit
            return
        self.left -= 1
        self.stream()


# Set after the class is made: Locust's metaclass adds the bases' tasks to any `tasks` given in the class body.
SeededRequestsUser.tasks = [SeededRequestsUser.bounded_stream]

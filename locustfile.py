"""stopstorm: what happens on an LLM server when users press Stop.

Run `locust -f locustfile.py` (no --host: an embedded vLLM-faithful simulator is started for you).
"""

from locust import run_single_user

import metrics.locust_hooks  # noqa: F401  (registers stopstorm's command-line options and event hooks)
from users.placeholder import ChatStreamUser

__all__ = ["ChatStreamUser"]

if __name__ == "__main__":
    run_single_user(ChatStreamUser)

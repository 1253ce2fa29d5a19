"""stopstorm: what happens on an LLM server when users press Stop.

Run `locust -f locustfile.py` (no --host: an embedded vLLM-faithful simulator is started for you).
Every client stack below takes part; pick some by naming their classes on the command line, e.g.
`locust -f locustfile.py RequestsUser OpenAIAsyncUser`.
"""

from locust import run_single_user

import metrics.gpu_hooks  # (GPU sampling: NVML or a DCGM exporter, tied to each Stop)
import metrics.locust_hooks  # noqa: F401  (registers stopstorm's command-line options and event hooks)
from users.stack_fasthttp import FastHttpStreamUser
from users.stack_httpx import HttpxUser
from users.stack_httpx_async import HttpxAsyncUser
from users.stack_openai import OpenAIUser
from users.stack_openai_async import OpenAIAsyncUser
from users.stack_requests import RequestsUser

__all__ = ["FastHttpStreamUser", "HttpxAsyncUser", "HttpxUser", "OpenAIAsyncUser", "OpenAIUser", "RequestsUser"]

if __name__ == "__main__":
    run_single_user(RequestsUser)

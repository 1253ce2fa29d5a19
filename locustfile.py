"""stopstorm: what happens on an LLM server when users press Stop.

Run `locust -f locustfile.py` (no --host: an embedded vLLM-faithful simulator is started for you).
Every client stack below takes part; pick some by naming their classes on the command line, e.g.
`locust -f locustfile.py RequestsUser OpenAIAsyncUser`.
"""

from locust import run_single_user

import stopstorm.metrics.plugin.hooks  # noqa: F401  (stopstorm's options and event hooks: the report, GPU, simulator…)
from stopstorm.users.stack_fasthttp import FastHttpStreamUser
from stopstorm.users.stack_httpx import HttpxUser
from stopstorm.users.stack_httpx_async import HttpxAsyncUser
from stopstorm.users.stack_openai import OpenAIUser
from stopstorm.users.stack_openai_async import OpenAIAsyncUser
from stopstorm.users.stack_requests import RequestsUser

__all__ = ["FastHttpStreamUser", "HttpxAsyncUser", "HttpxUser", "OpenAIAsyncUser", "OpenAIUser", "RequestsUser"]

if __name__ == "__main__":
    run_single_user(RequestsUser)

"""stopstorm: load-test LLM inference servers (vLLM first) for what happens when users press Stop.

One import name, four layers; arrows run down the list and never back:

- `stopstorm` itself: the entry points (`stopstorm.cli`, the shipped locustfiles) and `stopstorm.distributions`,
  the one piece of vocabulary both ends share (length distributions: the client's Stop points, the simulator's
  output lengths);
- `stopstorm.users`: the client, one Locust user class per client stack over one streaming core;
- `stopstorm.metrics`: the measuring side, in stage folders: `truth/` (readers of server truth), `analysis/`
  (pure figures), `report/` (one writer per format), `plugin/` (the only code on `locust.events`);
- `stopstorm.simulator`: the embedded vLLM-faithful target, which imports nothing of the rest.

Importing `stopstorm` imports none of them (and so not Locust, which patches the standard library for gevent).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stopstorm")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]

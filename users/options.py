"""stopstorm's user options as Locust command-line arguments (so also in the web UI and `locust.conf`),
and the validated settings every user reads.

Settings are parsed once per process; a bad value stops the run before any load, naming the option.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from locust.argument_parser import LocustArgumentParser

from stopstorm.metrics.plugin import options
from stopstorm.users.policy import CloseMix, StopPolicy
from stopstorm.users.preflight import check_server, check_url
from stopstorm.users.request import BUILTIN_PROMPTS, Messages, RequestFactory, load_prompts

__all__ = ["RunSettings", "add_arguments", "settings_for"]


def add_arguments(parser: LocustArgumentParser) -> None:
    g = options.argument_group(parser, "stopstorm streams", "what each simulated user streams and when it stops")
    g.add_argument("--endpoint", choices=["chat", "completions"], default="chat", env_var="STOPSTORM_ENDPOINT",
                   help="/v1/chat/completions or /v1/completions (default chat)")
    g.add_argument("--model", default="", env_var="STOPSTORM_MODEL",
                   help="model name to request (default: the first one the server lists at /v1/models)")
    g.add_argument("--prompts", default="", env_var="STOPSTORM_PROMPTS",
                   help="file of prompts: text (one a line) or JSONL of messages (default: a built-in varied set)")
    g.add_argument("--max-tokens", type=int, default=256, env_var="STOPSTORM_MAX_TOKENS",
                   help="max_tokens per request (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, env_var="STOPSTORM_TEMPERATURE",
                   help="sampling temperature (default 0)")
    g.add_argument("--ignore-eos", action="store_true", default=False, env_var="STOPSTORM_IGNORE_EOS",
                   help="ask the server to generate exactly max_tokens (vLLM's ignore_eos)")
    g.add_argument("--no-usage", action="store_true", default=False, env_var="STOPSTORM_NO_USAGE",
                   help="do not ask for stream_options usage (tokens are then counted from chunks)")
    g.add_argument("--no-continuous-usage", action="store_true", default=False,
                   env_var="STOPSTORM_NO_CONTINUOUS_USAGE",
                   help="ask for usage only in the last chunk, not in every chunk (continuous_usage_stats)")
    g.add_argument("--api-key", default="", env_var="STOPSTORM_API_KEY", is_secret=True,
                   help="API key sent as a Bearer token (default: $OPENAI_API_KEY if set); never printed")
    g.add_argument("--stop-probability", type=float, default=0.5, env_var="STOPSTORM_STOP_PROBABILITY",
                   help="chance that a user presses Stop during a stream (default 0.5)")
    g.add_argument("--stop-at", default="tokens:uniform:1:128", env_var="STOPSTORM_STOP_AT",
                   help="when Stop is pressed: tokens:<dist>, seconds:<dist> or first-token; <dist> is "
                   "fixed:N, uniform:A:B or exponential:MEAN (default tokens:uniform:1:128)")
    g.add_argument("--close-mix", default="close:1,drop:1,hold:1,none:1", env_var="STOPSTORM_CLOSE_MIX",
                   help="what the client does at Stop, weighted: close (explicit close), drop (drop every "
                   "reference, leave it to the GC), hold (keep the socket open for --hold-seconds), none (read to "
                   "the end) (default close:1,drop:1,hold:1,none:1)")
    g.add_argument("--hold-seconds", type=float, default=5.0, env_var="STOPSTORM_HOLD_SECONDS",
                   help="how long a `hold` keeps the abandoned stream open before releasing it (default 5)")
    g.add_argument("--think-time", type=float, default=1.0, env_var="STOPSTORM_THINK_TIME",
                   help="mean seconds a user waits between streams, exponential (default 1)")
    g.add_argument("--read-timeout", type=float, default=60.0, env_var="STOPSTORM_READ_TIMEOUT",
                   help="seconds without a byte (between tokens) before a stream counts as timed out (default 60)")
    g.add_argument("--connect-timeout", type=float, default=10.0, env_var="STOPSTORM_CONNECT_TIMEOUT",
                   help="seconds to connect before a stream counts as failed, and for the start-up check that "
                   "the host answers (default 10)")
    g.add_argument("--insecure", action="store_true", default=False, env_var="STOPSTORM_INSECURE",
                   help="do not verify the server's TLS certificate (default: verified, by every stack and the "
                   "start-up check)")
    g.add_argument("--headers-timeout", type=float, default=60.0, env_var="STOPSTORM_HEADERS_TIMEOUT",
                   help="seconds from send to the response headers before a stream counts as timed out "
                   "(default 60)")


@dataclass(frozen=True, slots=True)
class RunSettings:
    """Everything a streaming user needs, validated."""

    host: str
    requests: RequestFactory
    stop_policy: StopPolicy
    close_mix: CloseMix
    hold_seconds: float
    think_time: float
    read_timeout: float
    api_key: str | None
    connect_timeout: float = 10.0
    headers_timeout: float = 60.0
    insecure: bool = False  # --insecure: TLS certificates not verified


@dataclass(frozen=True, slots=True)
class _Parsed:
    """The options' values, checked, before any server is asked anything."""

    stop_policy: StopPolicy
    close_mix: CloseMix
    prompts: list[Messages]
    connect_timeout: float
    headers_timeout: float


def _parse(opts: Any) -> _Parsed:
    """Check every stream option's value; raises ValueError naming the option at fault."""
    if opts.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {opts.max_tokens}")
    for name in ("hold_seconds", "think_time", "read_timeout"):
        if getattr(opts, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(opts, name)}")
    connect_timeout = float(getattr(opts, "connect_timeout", 10.0))
    headers_timeout = float(getattr(opts, "headers_timeout", 60.0))
    for name, value in (("connect-timeout", connect_timeout), ("headers-timeout", headers_timeout)):
        if not value > 0:
            raise ValueError(f"--{name} must be > 0 seconds, got {value}")
    stop_policy = StopPolicy.parse(opts.stop_probability, opts.stop_at)
    close_mix = CloseMix.parse(opts.close_mix)
    prompts = load_prompts(opts.prompts) if opts.prompts else [[{"role": "user", "content": p}]
                                                               for p in BUILTIN_PROMPTS]
    return _Parsed(stop_policy, close_mix, prompts, connect_timeout, headers_timeout)


def check_options(opts: Any) -> None:
    """The stream options' check, run before anything starts (the target is checked later, in preflight)."""
    _parse(opts)


def build_settings(opts: Any, host: str, check: bool = False) -> RunSettings:
    """Validate the options; raises ValueError naming the option at fault. With `check` (a run's settings),
    the server too: reachable, OpenAI-compatible, serving --model; without it only when --model is not given
    (the model is then discovered), so a test can build settings for a server it knows."""
    host = host.rstrip("/")
    api_key = opts.api_key or os.environ.get("OPENAI_API_KEY") or None
    parsed = _parse(opts)
    check_url(host)
    models: list[str] = []
    if check or not opts.model:  # a bad URL, no answer or not OpenAI's API: refused here, before any load
        models = check_server(host, api_key, parsed.connect_timeout, verify=not getattr(opts, "insecure", False))
    if opts.model and models and opts.model not in models:
        raise ValueError(f"--model {opts.model!r}: {host} serves {', '.join(map(repr, models))}")
    model = opts.model or models[0]
    factory = RequestFactory(
        endpoint=opts.endpoint, model=model, prompts=parsed.prompts, max_tokens=opts.max_tokens,
        temperature=opts.temperature, ignore_eos=opts.ignore_eos, include_usage=not opts.no_usage,
        continuous_usage=not opts.no_continuous_usage, api_key=api_key,
    )
    return RunSettings(host, factory, parsed.stop_policy, parsed.close_mix, opts.hold_seconds, opts.think_time,
                       opts.read_timeout, api_key, parsed.connect_timeout, parsed.headers_timeout,
                       bool(getattr(opts, "insecure", False)))


_cache: dict[tuple[int, str], RunSettings] = {}


def settings_for(environment: Any, host: str) -> RunSettings:
    """The settings of this process's run against `host`, built on first use."""
    key = (id(environment), host)
    if key not in _cache:
        _cache[key] = build_settings(environment.parsed_options, host, check=True)
    return _cache[key]


def _preflight(environment: Any) -> None:
    """The target answers and serves the model: checked once the host is known, before any load."""
    settings_for(environment, environment.host)


options.register(add_arguments, check_options, rank=10)
options.register_preflight(_preflight)

"""stopstorm's user options as Locust command-line arguments (so also in the web UI and `locust.conf`),
and the validated settings every user reads.

Settings are parsed once per process; a bad value stops the run before any load, naming the option.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from locust.argument_parser import LocustArgumentParser

from stopstorm.metrics.plugin import options
from stopstorm.metrics.plugin.options import Number, Option, Parsed, seconds
from stopstorm.metrics.redact import add_secret, redact_url, secrets_of_url
from stopstorm.users.policy import CloseMix, StopPolicy
from stopstorm.users.preflight import ServerUnavailable, base_url, basic_authorization, check_server, check_url
from stopstorm.users.request import BUILTIN_PROMPTS, Messages, RequestFactory, load_prompts
from stopstorm.users.verdicts import warn_once

__all__ = ["MAX_TOKENS", "TABLE", "RunSettings", "add_arguments", "build_settings", "check_options", "settings_for"]

_log = logging.getLogger("stopstorm")


MAX_TOKENS = 2**31 - 1  # what a server's int32 takes; orjson cannot even write an int past 64 bits


TABLE = options.OptionTable("stopstorm streams", description="what each simulated user streams and when it stops",
                            options=(
    Option("--endpoint", "/v1/chat/completions or /v1/completions (default chat)", "chat",
           choices=("chat", "completions")),
    Option("--model", "model name to request (default: the first one the server lists at /v1/models)"),
    Option("--prompts", "file of prompts: text (one a line) or JSONL of messages (default: a built-in varied set)",
           rule=Parsed(lambda path: load_prompts(path), "a readable UTF-8 file of prompts", optional=True)),
    Option("--max-tokens", "max_tokens per request (default 256)", 256, Number(low=1, high=MAX_TOKENS, integer=True),
           int),
    Option("--temperature", "sampling temperature (default 0)", 0.0, Number(low=0.0), float),
    Option("--ignore-eos", "ask the server to generate exactly max_tokens (vLLM's ignore_eos)", False),
    Option("--no-usage", "do not ask for stream_options usage (tokens are then counted from chunks)", False),
    Option("--no-continuous-usage", "ask for usage only in the last chunk, not in every chunk "
           "(continuous_usage_stats)", False),
    Option("--api-key", "API key sent as a Bearer token (default: $OPENAI_API_KEY if set); never printed",
           secret=True),
    Option("--stop-probability", "chance that a user presses Stop during a stream (default 0.5)", 0.5,
           Number(low=0.0, high=1.0), float),
    Option("--stop-at", "when Stop is pressed: tokens:<dist>, seconds:<dist> or first-token; <dist> is fixed:N, "
           "uniform:A:B or exponential:MEAN (default tokens:uniform:1:128)", "tokens:uniform:1:128",
           Parsed(lambda spec: StopPolicy.parse(0.0, spec), "tokens:<dist>, seconds:<dist> or first-token")),
    Option("--close-mix", "what the client does at Stop, weighted: close (explicit close), drop (drop every "
           "reference, leave it to the GC), hold (keep the socket open for --hold-seconds), none (read to the end) "
           "(default close:1,drop:1,hold:1,none:1)", "close:1,drop:1,hold:1,none:1",
           Parsed(CloseMix.parse, "MODE[:WEIGHT],… with finite weights >= 0, one above 0")),
    Option("--hold-seconds", "how long a `hold` keeps the abandoned stream open before releasing it (default 5)",
           5.0, seconds(), float),
    Option("--think-time", "mean seconds a user waits between streams, exponential (default 1)", 1.0, seconds(),
           float),
    Option("--read-timeout", "seconds without a byte (between tokens) before a stream counts as timed out "
           "(default 60)", 60.0, seconds(above=True), float),
    Option("--connect-timeout", "seconds to connect before a stream counts as failed, and for the start-up check "
           "that the host answers (default 10)", 10.0, seconds(above=True), float),
    Option("--insecure", "do not verify the server's TLS certificate (default: verified, by every stack and the "
           "start-up check)", False),
    Option("--headers-timeout", "seconds from send to the response headers before a stream counts as timed out "
           "(default 60)", 60.0, seconds(above=True), float),
))


def add_arguments(parser: LocustArgumentParser) -> None:
    TABLE.add_arguments(parser)


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
    """Check every stream option's value (each by its rule in TABLE); raises ValueError naming the option."""
    TABLE.check(opts)
    connect_timeout = float(getattr(opts, "connect_timeout", 10.0))
    headers_timeout = float(getattr(opts, "headers_timeout", 60.0))
    stop_policy = StopPolicy.parse(opts.stop_probability, opts.stop_at)
    close_mix = CloseMix.parse(opts.close_mix)
    prompts = load_prompts(opts.prompts) if opts.prompts else [[{"role": "user", "content": p}]
                                                               for p in BUILTIN_PROMPTS]
    return _Parsed(stop_policy, close_mix, prompts, connect_timeout, headers_timeout)


def check_options(opts: Any) -> None:
    """The stream options' check, run before anything starts (the target is checked later, in preflight);
    a --host given is checked for its form here too."""
    _parse(opts)
    host = getattr(opts, "host", None)
    if host:
        check_url(base_url(host))


def build_settings(opts: Any, host: str, check: bool = False) -> RunSettings:
    """Validate the options; raises ValueError naming the option at fault. With `check` (a run's settings),
    the server too: OpenAI-compatible, serving --model; without it only when --model is not given (the model is
    then discovered), so a test can build settings for a server it knows. A server that cannot be reached is
    not refused (preflight.ServerUnavailable): the run records its streams' failures, and without --model the
    requests ask it for the model until it answers."""
    api_key = opts.api_key or os.environ.get("OPENAI_API_KEY") or None
    add_secret(api_key)
    secrets_of_url(host)
    authorization = basic_authorization(host)  # a userinfo: one Basic header for every stack (no API key given)
    if authorization and api_key:
        warn_once("userinfo", f"--host {redact_url(host)}: its user:password is not sent (the API key is)")
    host = redact_url(base_url(host))  # what every stack is given: no userinfo
    parsed = _parse(opts)
    check_url(host)
    models: list[str] = []
    verify = not getattr(opts, "insecure", False)

    def discover() -> list[str]:
        return check_server(host, api_key, parsed.connect_timeout, verify=verify, authorization=authorization)

    unavailable = False
    if check or not opts.model:  # a bad URL or a server that is not OpenAI's API: refused here, before any load
        try:
            models = discover()
        except ServerUnavailable as exc:  # the server's state, which the run records stream by stream
            unavailable = True
            later = "" if opts.model else "; the model is asked of it again as streams start"
            warn_once("unavailable", f"{exc}: the run goes on, each stream that fails recorded as such{later}")
    if opts.model and models and opts.model not in models:
        raise ValueError(f"--model {opts.model!r}: {redact_url(host)} serves {', '.join(map(repr, models))}")
    model = opts.model or (models[0] if models else "")
    factory = RequestFactory(
        endpoint=opts.endpoint, model=model, prompts=parsed.prompts, max_tokens=opts.max_tokens,
        temperature=opts.temperature, ignore_eos=opts.ignore_eos, include_usage=not opts.no_usage,
        continuous_usage=not opts.no_continuous_usage, api_key=api_key, authorization=authorization,
        discover=discover if unavailable and not opts.model else None,
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
    """The target answers and serves the model: checked once the host is known, before any load. A host given
    as the usual OpenAI base URL (`…/v1`) becomes the server's root for the whole run (every stack adds /v1)."""
    host = base_url(environment.host)
    if host != environment.host:
        _log.info("stopstorm: --host %s: using %s as the server's root (requests go to %s%s)",
                  redact_url(environment.host), redact_url(host), redact_url(host), "/v1/...")
        environment.host = host
        if environment.parsed_options is not None:
            environment.parsed_options.host = host
    settings_for(environment, host)


options.register(TABLE, check_options, rank=10)
options.register_preflight(_preflight)

"""Where the server's truth lives when `--host` is not the server: `--truth-url` and `--server-kind`.

In production a Stop crosses a gateway (nginx, HAProxy, an ingress) before it reaches the engine, and whether
the engine stops depends on every hop. To measure that, the users stream through the proxy (`--host`) while
the truth is read from the server itself (`--truth-url`): the simulator's ledger, vLLM's `/metrics`, the
stats a proxy would hide or answer itself. With no `--truth-url` the truth is read where the users stream.

`truth_host(environment)` is the one rule every reader follows (the run's report in plugin/hooks.py, the probe
in users/probe.py); `stream_truth(environment, host, log)` picks the per-stream truth reader for a server
without a ledger by `--server-kind` (or what its `/metrics` exposes: metrics/truth/server_profiles.py).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any
from urllib.parse import urlsplit

import requests
from locust import events

from stopstorm.metrics import redact
from stopstorm.metrics.plugin import options
from stopstorm.metrics.plugin.state import RUN
from stopstorm.metrics.truth.llama_stream import LLAMA_CPP_PYTHON_TRUTH_SOURCE, LlamaCppPythonStreamTruth
from stopstorm.metrics.truth.server_profiles import KINDS, ServerProfile, detect, profile, read
from stopstorm.metrics.truth.vllm_log import LineFollower
from stopstorm.metrics.truth.vllm_stream import VLLM_TRUTH_SOURCE, VllmStreamTruth

__all__ = ["SERVER_KINDS", "TABLE", "StreamTruthReader", "check_truth_url", "describe_server", "server_kind",
           "stream_truth", "truth_host", "truth_source"]

_log = logging.getLogger("stopstorm")

SERVER_KINDS = ("auto", *KINDS)


def check_truth_url(url: str) -> str:
    """The truth URL without a trailing slash or `/v1`; ValueError naming --truth-url for anything but
    http(s)://HOST[:PORT][/path]."""
    url = (url or "").strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")].rstrip("/")
    shown = redact.redact_url(url)
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"--truth-url {shown!r}: not a valid URL ({exc}); expected http(s)://HOST[:PORT]") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--truth-url {shown!r}: not a valid URL; expected http(s)://HOST[:PORT] (the server's own "
                         "address, where its ledger, /metrics and log live)")
    if parts.query or parts.fragment:
        raise ValueError(f"--truth-url {shown!r}: a base URL takes no query or fragment")
    return url


def _check(opts: Any) -> None:
    url = getattr(opts, "truth_url", "") or ""
    if url:
        redact.secrets_of_url(url)


TABLE = options.OptionTable("stopstorm server truth", options=(
    options.Option("--truth-url", "where the server's own truth lives (the simulator's ledger, vLLM's /metrics) when "
                   "--host points at a proxy or gateway in front of it, e.g. --host http://127.0.0.1:8080 (nginx) "
                   "--truth-url http://127.0.0.1:8000 (the server); default: --host",
                   "", options.Parsed(check_truth_url, "http(s)://HOST[:PORT]", optional=True)),
    options.Option("--server-kind", "which server --truth-url (or --host) is, for the probe's per-stream truth when it "
                   "has no simulator ledger: vLLM's log and /metrics (auto, vllm), or llama-cpp-python's log and its "
                   "one lock (llama-cpp-python: it has no /metrics); a run against another kind says what its "
                   f"/metrics shows (default auto; one of {', '.join(SERVER_KINDS)})",
                   "auto", choices=SERVER_KINDS),
))

options.register(TABLE, _check, rank=45)


def truth_host(environment: Any) -> str:
    """The URL the server's truth is read from: `--truth-url` when given, else the host the users stream to."""
    opts = getattr(environment, "parsed_options", None)
    url = (getattr(opts, "truth_url", "") or "") if opts is not None else ""
    if url:
        return check_truth_url(url)  # checked at init: only normalised here
    return (getattr(environment, "host", "") or "").rstrip("/")


def server_kind(environment: Any) -> str:
    opts = getattr(environment, "parsed_options", None)
    kind = (getattr(opts, "server_kind", "") or "auto") if opts is not None else "auto"
    return kind if kind in SERVER_KINDS else "auto"


class _NoStreamTruth:
    """The probe's reader for a server kind it cannot judge stream by stream yet: never available, saying why."""

    def __init__(self, kind: str, host: str) -> None:
        self.metrics = _Why(f"{host}/metrics", f"--server-kind {kind}: the probe has no per-stream truth for "
                            f"{profile(kind).title} yet (its profile reads /metrics and its log lines for a run; "
                            "docs/guides/llama-cpp.md#the-other-servers-profiles)")
        self.log: LineFollower | None = None

    def start(self) -> _NoStreamTruth:
        return self

    def available(self) -> bool:
        return False

    def before_stream(self) -> None:
        raise RuntimeError(self.metrics.last_error)

    def settle(self, server_id: str, timeout: float) -> dict[str, Any]:
        raise RuntimeError(self.metrics.last_error)

    def close(self) -> None:
        pass


class _Why:
    def __init__(self, url: str, last_error: str) -> None:
        self.url, self.last_error = url, last_error


StreamTruthReader = VllmStreamTruth | LlamaCppPythonStreamTruth | _NoStreamTruth
"""A per-stream truth reader for one stream at a time (the probe's); all have vllm_stream.py's shape."""


def stream_truth(environment: Any, log: str | os.PathLike[str] | LineFollower) -> StreamTruthReader:
    """The per-stream truth reader for a server without a ledger at `truth_host`: llama-cpp-python's (its log
    and its one lock) when --server-kind says so; vLLM's (its log and /metrics) for vLLM or auto; for another
    kind (SGLang, llama.cpp, TensorRT-LLM: profiles only, none runs here) a reader that says so."""
    host = truth_host(environment)
    kind = server_kind(environment)
    if kind == "llama-cpp-python":
        return LlamaCppPythonStreamTruth(host, log)
    if kind in ("auto", "vllm", "vllm-0.9"):
        return VllmStreamTruth(host, log)
    return _NoStreamTruth(kind, host)


def truth_source(reader: object) -> str:
    """The words the probe's table names its truth with."""
    return LLAMA_CPP_PYTHON_TRUTH_SOURCE if isinstance(reader, LlamaCppPythonStreamTruth) else VLLM_TRUTH_SOURCE


def describe_server(url: str, kind: str = "auto", timeout: float = 2.0) -> tuple[ServerProfile | None, str]:
    """Which server `url` is by its /metrics (or `kind`), and one line of what its own counters say now."""
    try:
        resp = requests.get(f"{url}/metrics", timeout=timeout)
        text = resp.text if resp.status_code == 200 else ""
    except requests.RequestException:
        text = ""
    found = profile(kind) if kind != "auto" else (detect(text) if text else None)
    if found is None:
        return None, f"{redact.redact_url(url)}/metrics names no server stopstorm knows (--server-kind names one)"
    if not text or not found.has_metrics:
        return found, f"{found.title}: no /metrics of its own; {found.blind_spot}"
    r = read(text, found, time.monotonic())
    return found, (f"{found.title}: running {r.running}, waiting {r.waiting}, generation tokens "
                   f"{r.generation_tokens}, aborted {r.aborted if found.counts_aborts else 'not counted'}; "
                   f"{found.blind_spot}")


@events.test_start.add_listener
def _say_which_server(environment: Any, **_kwargs: Any) -> None:
    """Once, where the run is collected: a server other than vLLM (or the simulator, which speaks vLLM's names)
    gets a line saying so, since the report's counters are read by vLLM's names."""
    if not RUN.collects or not getattr(environment, "host", None):
        return
    url = truth_host(environment)
    found, line = describe_server(url, server_kind(environment))
    if found is None or not found.kind.startswith("vllm"):
        _log.warning("stopstorm: truth at %s: %s; the report's vLLM counters read nothing there",
                     redact.redact_url(url), line)

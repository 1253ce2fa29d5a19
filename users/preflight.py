"""The start-up check of the target server, before any load: a bad URL, or a server that answers but does not
speak OpenAI's API (or not with this key) stops the run with the option named, instead of a run whose every
stream fails for a typo.

A server that cannot be reached (no connection within `--connect-timeout`, or no answer) or that answers 5xx is
not a typo but the server's state, which a load test measures: `ServerUnavailable` says so, and the run goes on,
each stream that fails recorded as such (users/options.py warns once and asks the model of the server later).

OpenAI-compatible here means what every stack relies on: `GET /v1/models` answers 200 with
`{"data": [{"id": …}, …]}` (vLLM, the simulator and OpenAI itself do). A redirect is not followed, as no stack
follows one (docs/guides/hostile-input.md): the run would measure another server than the one it names.

`base_url` is the one rule for what `--host` means: the server's root, so the usual OpenAI base URL
(`http://HOST:PORT/v1`) is taken as `http://HOST:PORT` (every stack adds `/v1/...` itself). Messages name the
URL as given, without its userinfo, and the URL actually requested.
"""

from __future__ import annotations

import base64
import re
import socket
import time
from urllib.parse import unquote, urlsplit

import orjson
import requests

from stopstorm.metrics.redact import add_secret, redact_url

__all__ = ["ServerUnavailable", "base_url", "basic_authorization", "check_server", "check_url"]


class ServerUnavailable(ValueError):
    """The host gave no usable answer at the start (no connection, no answer, 5xx): its state, not a typo."""


def base_url(host: str) -> str:
    """The server's root from `--host`: without a trailing slash or a trailing `/v1` (the OpenAI base URL)."""
    host = (host or "").strip().rstrip("/")
    if host.endswith("/v1"):
        host = host[: -len("/v1")].rstrip("/")
    return host


def check_url(host: str) -> tuple[str, int]:
    """The host and port of a base URL; ValueError naming --host for anything but http(s)://HOST[:PORT][/path]."""
    shown = redact_url(host)
    try:
        parts = urlsplit(host)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"--host {shown!r}: not a valid URL ({exc}); expected http(s)://HOST[:PORT]") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--host {shown!r}: not a valid URL; expected http(s)://HOST[:PORT] (scheme http or https)")
    if parts.query or parts.fragment:
        raise ValueError(f"--host {shown!r}: a base URL takes no query or fragment")
    return parts.hostname, port if port is not None else (443 if parts.scheme == "https" else 80)


def basic_authorization(url: str) -> str | None:
    """`Basic <base64>` for a URL's userinfo (`http://user:pass@host`), or None: the one header every stack and
    the start-up check send for it (the URL they are given has no userinfo: some stacks would send it, others
    not, and it would replace the API key's Bearer token in some)."""
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        return None
    if user is None and password is None:
        return None
    token = base64.b64encode(f"{unquote(user or '')}:{unquote(password or '')}".encode()).decode()
    add_secret(token)
    return f"Basic {token}"


def tls_failure(exc: BaseException) -> str:
    """What a failed TLS handshake means for the user, and what to do: unlike a server that is down, it stays so
    for the whole run (every stack verifies the same certificate), so it refuses the run like a bad option."""
    detail = str(exc)
    verify = re.search(r"certificate verify failed: ([^(\]'\"]+)", detail)
    if verify is not None or "CERTIFICATE_VERIFY_FAILED" in detail:
        why = verify.group(1).strip() if verify is not None else "certificate verify failed"
        return (f"the server's TLS certificate is not trusted ({why}); pass --insecure to skip verification, or "
                "trust its CA (SSL_CERT_FILE, and REQUESTS_CA_BUNDLE for the requests stack)")
    reason = re.search(r"\[SSL: ([A-Z_]+)\] ([^(\]'\"]+)", detail)
    said = f"{reason.group(2).strip()}" if reason is not None else type(exc).__name__
    return f"the TLS handshake failed ({said}); is the server serving TLS on this port? (http:// if not)"


def check_server(host: str, api_key: str | None, connect_timeout: float = 10.0, verify: bool = True,
                 authorization: str | None = None) -> list[str]:
    """The model ids `host` serves, once it has been found reachable and OpenAI-compatible; ValueError if not."""
    hostname, port = check_url(host)
    shown = redact_url(host)
    started = time.monotonic()
    try:
        socket.create_connection((hostname, port), timeout=connect_timeout).close()
    except OSError as exc:
        waited = time.monotonic() - started
        raise ServerUnavailable(f"--host {shown}: cannot connect to {hostname}:{port} ({exc.strerror or exc}, after "
                         f"{waited:.1f} s; --connect-timeout {connect_timeout:g})") from None
    url = f"{host}/v1/models"
    path = urlsplit(url).path
    auth = f"Bearer {api_key}" if api_key else authorization
    headers = {"Authorization": auth} if auth else {}
    try:
        resp = requests.get(url, headers=headers, timeout=(connect_timeout, max(connect_timeout, 10.0)), verify=verify,
                            allow_redirects=False)
    except requests.exceptions.SSLError as exc:
        raise ValueError(f"--host {shown}: GET {path} failed: SSLError: {tls_failure(exc)}") from None
    except requests.RequestException as exc:
        raise ServerUnavailable(f"--host {shown}: GET {path} failed: {type(exc).__name__}") from None
    if 300 <= resp.status_code < 400:
        where = redact_url(resp.headers.get("location", "")) or "(no Location)"
        raise ValueError(f"--host {shown}: GET {path} answered HTTP {resp.status_code} redirect to {where}; "
                         "redirects are not followed: give the server's own URL as --host")
    if resp.status_code >= 500:
        raise ServerUnavailable(f"--host {shown}: GET {path} answered HTTP {resp.status_code}")
    if resp.status_code != 200:
        raise ValueError(f"--host {shown}: not an OpenAI-compatible server: GET {path} answered HTTP "
                         f"{resp.status_code} (expected 200 with a model list)")
    try:
        models = [str(card["id"]) for card in orjson.loads(resp.content)["data"]]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"--host {shown}: not an OpenAI-compatible server: GET {path} is not "
                         "{\"data\": [{\"id\": …}]}") from None
    if not models:
        raise ValueError(f"--host {shown}: GET {path} lists no model")
    return models

"""The start-up check of the target server, before any load: a bad URL, a host that does not answer within
`--connect-timeout`, or a server that does not speak OpenAI's API stops the run with the option named, instead
of a run whose every stream fails.

OpenAI-compatible here means what every stack relies on: `GET /v1/models` answers 200 with
`{"data": [{"id": …}, …]}` (vLLM, the simulator and OpenAI itself do).
"""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import orjson
import requests

__all__ = ["check_server", "check_url"]


def check_url(host: str) -> tuple[str, int]:
    """The host and port of a base URL; ValueError naming --host for anything but http(s)://HOST[:PORT][/path]."""
    try:
        parts = urlsplit(host)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"--host {host!r}: not a valid URL ({exc}); expected http(s)://HOST[:PORT]") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--host {host!r}: not a valid URL; expected http(s)://HOST[:PORT] (scheme http or https)")
    if parts.query or parts.fragment:
        raise ValueError(f"--host {host!r}: a base URL takes no query or fragment")
    return parts.hostname, port if port is not None else (443 if parts.scheme == "https" else 80)


def check_server(host: str, api_key: str | None, connect_timeout: float = 10.0, verify: bool = True) -> list[str]:
    """The model ids `host` serves, once it has been found reachable and OpenAI-compatible; ValueError if not."""
    hostname, port = check_url(host)
    started = time.monotonic()
    try:
        socket.create_connection((hostname, port), timeout=connect_timeout).close()
    except OSError as exc:
        waited = time.monotonic() - started
        raise ValueError(f"--host {host}: cannot connect to {hostname}:{port} ({exc.strerror or exc}, after "
                         f"{waited:.1f} s; --connect-timeout {connect_timeout:g})") from None
    url = f"{host}/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = requests.get(url, headers=headers, timeout=(connect_timeout, max(connect_timeout, 10.0)), verify=verify)
    except requests.RequestException as exc:
        raise ValueError(f"--host {host}: GET /v1/models failed: {type(exc).__name__}") from None
    if resp.status_code != 200:
        raise ValueError(f"--host {host}: not an OpenAI-compatible server: GET /v1/models answered HTTP "
                         f"{resp.status_code} (expected 200 with a model list)")
    try:
        models = [str(card["id"]) for card in orjson.loads(resp.content)["data"]]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"--host {host}: not an OpenAI-compatible server: GET /v1/models is not "
                         "{\"data\": [{\"id\": …}]}") from None
    if not models:
        raise ValueError(f"--host {host}: GET /v1/models lists no model")
    return models

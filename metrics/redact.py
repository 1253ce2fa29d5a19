"""Secrets never written: the API key and a URL's password are replaced wherever stopstorm prints or stores text.

A server may echo the key it was sent (`HTTP 401: Incorrect API key provided: Bearer sk-…`), and a user may put a
password in `--host http://user:pass@host`. The secrets this process knows (`add_secret`, called when the run's
settings are built) are replaced by `***` in every text that leaves a stream (its record's error, so the console,
the report, the JSONL records, Locust's failure table and the web UI), and a URL's userinfo is cut from every URL
stopstorm prints or stores (`redact_url`). `install_log_filter` does the same for every log line of the process.
A `Bearer <token>` or `Basic <token>` in any text is masked too, whatever the token: it can only be a credential.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["MASK", "add_secret", "install_log_filter", "redact", "redact_tree", "redact_url", "secrets_of_url"]

MASK = "***"
_secrets: set[str] = set()
_BEARER = re.compile(r"(?i)(\bbearer\s+)(?!\*\*\*)[A-Za-z0-9._~+/=-]+")  # RFC 6750's token characters
_BASIC = re.compile(r"(\bBasic\s+)[A-Za-z0-9+/]{8,}={0,2}")  # RFC 7617's base64 user:password (not "basic auth")
_USERINFO = re.compile(r"(?i)\b(https?://)[^/\s@]+@")
_SHORT = 8  # a secret shorter than this is replaced only where it stands alone, not inside other words


def add_secret(secret: str | None) -> None:
    """A value never to be written (the API key, a URL's password)."""
    if secret and secret.strip() and secret != "EMPTY":
        _secrets.add(secret)


def secrets_of_url(url: str) -> None:
    """Register the userinfo of `url` (user:password, the password alone) as secrets."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return
    if password:
        add_secret(password)
        add_secret(unquote(password))
    if "@" in parts.netloc:
        add_secret(parts.netloc.rpartition("@")[0])


def redact(text: str) -> str:
    """`text` with every known secret, a Bearer token and a URL's userinfo replaced."""
    if not text:
        return text
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            if len(secret) >= _SHORT:
                text = text.replace(secret, MASK)
            else:
                text = re.sub(rf"(?<![\w-]){re.escape(secret)}(?![\w-])", MASK, text)
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(rf"\g<1>{MASK}", text)
    if "Basic" in text:
        text = _BASIC.sub(rf"\g<1>{MASK}", text)
    if "@" in text:
        text = _USERINFO.sub(r"\g<1>", text)
    return text


def redact_tree(value: Any) -> Any:
    """`value` (a report document: dicts, lists, strings, numbers) with every string redacted, keys too."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_tree(v) for v in value]
    return value


def redact_url(url: str) -> str:
    """`url` without its userinfo (`http://user:pass@host:8000/x` → `http://host:8000/x`)."""
    if not url or "@" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=netloc))


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_FILTER = _RedactingFilter()


def install_log_filter() -> None:
    """Redact every log line the process writes (a filter on the root logger's handlers and on the root)."""
    root = logging.getLogger()
    for target in (root, *root.handlers):
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)

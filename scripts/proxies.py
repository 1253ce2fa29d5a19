#!/usr/bin/env python3
"""Run nginx or HAProxy on loopback in front of a server, with the configurations in examples/proxies/.

A Stop rarely goes straight from the client to the engine: it crosses a gateway first, and whether the engine
stops then depends on the gateway's settings. This helper starts one of the shipped configurations
(`VARIANTS`) on a free loopback port in front of an upstream URL, so the tests and benchmarks/bench_proxies.py
can stream through it while reading the truth from the server itself (stopstorm's `--truth-url`).

Needs the Debian packages `nginx` and `haproxy` (`.ci/run` installs them where missing); stdlib only.

    python3 scripts/proxies.py serve nginx-sse --upstream http://127.0.0.1:8000    # prints the URL, runs until ^C
    python3 scripts/proxies.py list

Python API (the repo root on sys.path)::

    from scripts.proxies import Proxy
    with Proxy("nginx-sse", "http://127.0.0.1:8000") as proxy:
        proxy.url          # "http://127.0.0.1:PORT"
        proxy.access_log   # nginx's access log (status 499: the client closed first)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "proxies"

__all__ = ["VARIANTS", "Proxy", "ProxyVariant", "missing", "proxy_binary"]


@dataclass(frozen=True)
class ProxyVariant:
    """One proxy configuration: which program, which template, and what fills its settings."""

    name: str
    program: str  # "nginx" or "haproxy"
    settings: dict[str, str]
    what: str  # in words, for the docs table

    @property
    def template(self) -> Path:
        return EXAMPLES / ("nginx-sse.conf" if self.program == "nginx" else "haproxy.cfg")


VARIANTS: dict[str, ProxyVariant] = {v.name: v for v in (
    ProxyVariant("nginx-sse", "nginx", {"BUFFERING": "off", "IGNORE_ABORT": "off"},
                 "nginx, proxy_buffering off (as deployments set it for SSE), proxy_ignore_client_abort off"),
    ProxyVariant("nginx-buffered", "nginx", {"BUFFERING": "on", "IGNORE_ABORT": "off"},
                 "nginx, proxy_buffering on (nginx's default), proxy_ignore_client_abort off"),
    ProxyVariant("nginx-sse-ignore-abort", "nginx", {"BUFFERING": "off", "IGNORE_ABORT": "on"},
                 "nginx, proxy_buffering off, proxy_ignore_client_abort on"),
    ProxyVariant("nginx-buffered-ignore-abort", "nginx", {"BUFFERING": "on", "IGNORE_ABORT": "on"},
                 "nginx, proxy_buffering on, proxy_ignore_client_abort on"),
    ProxyVariant("haproxy", "haproxy", {"OPTIONS": "# (defaults)"}, "HAProxy, mode http, defaults"),
    ProxyVariant("haproxy-abortonclose", "haproxy", {"OPTIONS": "option abortonclose"},
                 "HAProxy, mode http, option abortonclose"),
    ProxyVariant("haproxy-no-delay", "haproxy", {"OPTIONS": "option http-no-delay"},
                 "HAProxy, mode http, option http-no-delay (every chunk sent at once)"),
)}


def proxy_binary(program: str) -> str | None:
    """The program's path (Debian installs both in /usr/sbin, which a non-root PATH may lack)."""
    return shutil.which(program) or next((str(p) for p in (Path("/usr/sbin") / program,) if p.exists()), None)


def missing() -> list[str]:
    """The proxy programs not installed here."""
    return [p for p in ("nginx", "haproxy") if proxy_binary(p) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hostport(url: str) -> str:
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"upstream {url!r}: expected http://HOST:PORT")
    return f"{parts.hostname}:{parts.port}"


class Proxy:
    """One proxy process on a free loopback port; stopped (by PID, then its process group) on exit."""

    def __init__(self, variant: str, upstream: str, start_timeout: float = 10.0) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown proxy variant {variant!r}; choose from {', '.join(VARIANTS)}")
        self.variant = VARIANTS[variant]
        self.upstream = upstream.rstrip("/")
        self.start_timeout = start_timeout
        self.dir = Path(tempfile.mkdtemp(prefix=f"stopstorm-{variant}-"))
        self.dir.chmod(0o755)  # nginx's workers (nobody under root) create their temp files in here
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def access_log(self) -> Path:
        return self.dir / "access.log"

    @property
    def error_log(self) -> Path:
        return self.dir / ("error.log" if self.variant.program == "nginx" else "haproxy.log")

    def config_text(self) -> str:
        text = self.variant.template.read_text()
        fields = {"LISTEN": f"127.0.0.1:{self.port}", "UPSTREAM": _hostport(self.upstream), "DIR": str(self.dir),
                  **self.variant.settings}
        for key, value in fields.items():
            text = text.replace(f"@{key}@", value)
        if "@" in "".join(line.split("#")[0] for line in text.splitlines()):
            raise ValueError(f"{self.variant.template}: a field was left unfilled")
        return text

    def start(self) -> Proxy:
        binary = proxy_binary(self.variant.program)
        if binary is None:
            raise RuntimeError(f"{self.variant.program} is not installed (Debian: apt-get install "
                               f"{self.variant.program})")
        conf = self.dir / self.variant.template.name
        conf.write_text(self.config_text())
        if self.variant.program == "nginx":
            cmd = [binary, "-p", str(self.dir), "-e", str(self.error_log), "-c", str(conf)]
        else:
            cmd = [binary, "-db", "-f", str(conf)]
        with self.error_log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.variant.name} exited at start ({self.proc.returncode}): "
                                   f"{self.error_log.read_text(errors='replace')[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.variant.name} did not listen on {self.port} within {self.start_timeout} s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # nginx: fast shutdown of master and workers; haproxy: stops
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the workers too
            proc.wait(10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the shipped variants")
    serve = sub.add_parser("serve", help="run one variant until interrupted")
    serve.add_argument("variant", choices=list(VARIANTS))
    serve.add_argument("--upstream", required=True, help="the server, http://HOST:PORT")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for v in VARIANTS.values():
            print(f"{v.name:28s} {v.what}")
        return 0
    with Proxy(args.variant, args.upstream) as proxy:
        print(f"{proxy.variant.name} at {proxy.url} -> {args.upstream} (pid {proxy.proc.pid if proxy.proc else '?'}, "
              f"files in {proxy.dir})", flush=True)
        try:
            while proxy.proc is not None and proxy.proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

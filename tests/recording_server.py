"""A loopback OpenAI-style server that records every request's credentials: the truth for the security tests.

    python tests/recording_server.py [--tls CERT KEY]    # prints "recording server listening on URL"

`GET /v1/models` lists the model `llm`; `POST /v1/chat/completions` answers a well-formed chat stream
(hostile_server.py's, 5 tokens, Connection: close). Every request is recorded as it arrives, before any
answer: method, path, and its `Authorization`, `X-Request-Id` and `User-Agent` headers; `GET /_received` is
that list, in order (not recorded itself). With `--tls` every connection is TLS with the given certificate;
a handshake the client refuses (it does not trust the certificate) is counted in `/_received`'s
`tls_refused`, with the reason the server's side saw. Its own process (plain threads, no gevent), started by
the tests and stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import ssl
import sys
import threading
from typing import Any

from hostile_server import Conn, _read_request, _Server, stream_events

_lock = threading.Lock()
_received: list[dict[str, str]] = []
_tls_refused: list[str] = []
_tls: ssl.SSLContext | None = None


def _json(conn: Conn, doc: Any) -> None:
    body = json.dumps(doc).encode()
    conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n"
              b"\r\n%s" % (len(body), body))


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10.0)
        try:
            if _tls is not None:
                try:
                    sock = _tls.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError) as exc:  # the client refused our certificate (or went away)
                    with _lock:
                        _tls_refused.append(str(exc))
                    return
            request = _read_request(sock)
            if request is None:
                return
            method, path, headers = request
            conn = Conn(sock, path, headers)
            if method == "GET" and path == "/_received":
                with _lock:
                    _json(conn, {"requests": list(_received), "tls_refused": list(_tls_refused)})
                return
            with _lock:
                _received.append({"method": method, "path": path,
                                  "authorization": headers.get("authorization", ""),
                                  "request_id": headers.get("x-request-id", ""),
                                  "user_agent": headers.get("user-agent", "")})
            if method == "GET" and path.endswith("/v1/models"):
                _json(conn, {"object": "list", "data": [{"id": "llm", "object": "model"}]})
            elif method == "POST" and path.endswith("/v1/chat/completions"):
                conn.sse(b"".join(stream_events()))
            else:
                conn.send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.close()


def main() -> None:
    global _tls
    args = sys.argv[1:]
    if args[:1] == ["--tls"]:
        _tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _tls.load_cert_chain(args[1], args[2])
    server = _Server(("127.0.0.1", 0), _Handler)
    scheme = "https" if _tls is not None else "http"
    print(f"recording server listening on {scheme}://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

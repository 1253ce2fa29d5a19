"""`python -m stopstorm.simulator`: serve one simulated vLLM on loopback (see `--help`)."""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
import threading
import time

import uvicorn

from stopstorm.simulator.config import build_parser, config_from_args
from stopstorm.simulator.faults import FaultPlan
from stopstorm.simulator.gpu_work import GpuWorkUnavailable
from stopstorm.simulator.launcher import READY_PREFIX
from stopstorm.simulator.request_log import configure_logging
from stopstorm.simulator.server import create_app


def _exit_with_parent(parent_pid: int) -> None:
    """An embedded simulator must not outlive the locust process that started it: SIGTERM ourselves then."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args)
    try:
        FaultPlan(config.faults)
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(args.log_file)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        sys.exit(f"simulator: cannot bind {args.host}:{args.port}: {exc.strerror}")
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    try:
        app = create_app(config)
    except GpuWorkUnavailable as exc:
        sys.exit(f"simulator: --gpu-work needs torch with CUDA: {exc}")
    server = uvicorn.Server(uvicorn.Config(
        app, loop="auto", http="auto", log_level="warning", access_log=False, timeout_keep_alive=30,
        backlog=2048, lifespan="on",
    ))
    if args.parent_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    # Each stream keeps ~6 GC-tracked objects alive across steps, so at 1,024 streams the default young-generation
    # threshold (700) runs a collection nearly every step and a full one stalls the loop 30-50 ms every few
    # seconds: step lag the model never asked for. A larger threshold keeps steps on time (see the benchmark).
    gc.set_threshold(50_000, 10, 10)
    url_host = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"{READY_PREFIX}http://{url_host}:{port}", flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Record real vLLM output as test fixtures: `/metrics` text at rest, under load and after aborts, and the log.

Manual, for tests/fixtures/vllm-*/ (each has a README.txt saying when, with what, and what to expect). Either
this script starts the server (`real_vllm.py`'s RealVllm from the cached venv) or it records from one already
running (`--url` and `--log`: any vLLM, e.g. an older one set up by hand; the log must be its stdout+stderr).

Sequence (POST /v1/chat/completions, ignore_eos, continuous usage stats, each with its own X-Request-Id):

1. `metrics-before.txt` at rest, before any request;
2. one stream read to the end (`fix-full-1`, 64 tokens), then two closed early, after 5 and 10 chunks
   (`fix-cut-5`, `fix-cut-10`), one after another, 1 s apart;
3. `metrics-after.txt` 2 s later;
4. with `--load`: three long streams at once against `--max-num-seqs 2` (two run, one waits), `metrics-load.txt`
   taken while they run, each closed after 300 chunks; `metrics-after-aborts.txt` 2 s after the last close;
5. `streams.json`: what every client saw; `server.log`: the log (copied when the server is not ours).

    python3 scripts/record_vllm_fixtures.py [--cpus 1] [--out tests/fixtures/vllm-0.32-cpu] [--load]
    python3 scripts/record_vllm_fixtures.py --url http://127.0.0.1:8732 --log serve.log --out DIR --load
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.real_vllm import RealVllm, _stream

LOAD_MAX_TOKENS = 1500
LOAD_CUT_CHUNKS = 300


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()


@contextlib.contextmanager
def _server(args: argparse.Namespace, out: Path) -> Iterator[tuple[str, int, float | None, Path]]:
    """(url, port, start-up seconds or None, log path) of the server to record from."""
    if args.url:
        port = urlsplit(args.url).port
        assert port is not None, "--url needs a port"
        yield args.url.rstrip("/"), port, None, Path(args.log)
        return
    log_path = out / "server.log"
    with RealVllm(log_path=log_path, max_num_seqs=2, cpus=args.cpus) as srv:
        yield srv.url, srv.port, srv.startup_s, log_path


def _load(url: str, port: int, out: Path) -> list[dict]:
    """Three long streams at once (two run, one waits), /metrics while they run, each closed after 300 chunks."""
    results: list[dict] = []

    def one(rid: str) -> None:
        t0 = time.monotonic()
        res = _stream(port, rid, max_chunks=LOAD_CUT_CHUNKS, max_tokens=LOAD_MAX_TOKENS)
        res.update(request_id=rid, max_chunks=LOAD_CUT_CHUNKS, max_tokens=LOAD_MAX_TOKENS, started_mono=t0)
        results.append(res)

    threads = [threading.Thread(target=one, args=(f"fix-load-{i}",)) for i in (1, 2, 3)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    time.sleep(0.15)
    (out / "metrics-load.txt").write_text(_metrics(url))
    for t in threads:
        t.join(60)
    time.sleep(2.0)
    (out / "metrics-after-aborts.txt").write_text(_metrics(url))
    return sorted(results, key=lambda r: r["request_id"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpus", default=None, help="pin the server we start to these CPUs (taskset -c)")
    p.add_argument("--out", default="tests/fixtures/vllm-0.32-cpu")
    p.add_argument("--url", help="record from this running server instead of starting one")
    p.add_argument("--log", help="that server's log file (stdout+stderr), copied to OUT/server.log")
    p.add_argument("--load", action="store_true", help="also record /metrics under load and after aborts")
    args = p.parse_args()
    if bool(args.url) != bool(args.log):
        p.error("--url and --log go together")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with _server(args, out) as (url, port, startup, log_path):
        time.sleep(1.0)
        (out / "metrics-before.txt").write_text(_metrics(url))
        streams = []
        for rid, cut in (("fix-full-1", None), ("fix-cut-5", 5), ("fix-cut-10", 10)):
            t0 = time.monotonic()
            res = _stream(port, rid, max_chunks=cut)
            res.update(request_id=rid, max_chunks=cut, started_mono=t0)
            streams.append(res)
            time.sleep(1.0)
        time.sleep(1.0)
        (out / "metrics-after.txt").write_text(_metrics(url))
        load = _load(url, port, out) if args.load else []
        if args.url:
            time.sleep(0.5)
            shutil.copyfile(log_path, out / "server.log")
    doc = {"startup_s": startup, "streams": streams}
    if load:
        doc["load_streams"] = load
    (out / "streams.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

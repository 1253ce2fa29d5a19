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

With `--early-stop` it records instead the log of streams closed early, for a classifier that must tell from
the log alone what became of each: never reached the engine, aborted, or ran on to its end (see
docs/guides/missed-closes.md). It starts two servers one after the other, with `--enable-log-requests` only and
with `--enable-log-outputs` too, and writes for each `OUT/<variant>/server.log` and `OUT/<variant>/clients.json`
(what every client did, with its X-Request-Id, when it sent and closed on the monotonic clock, what it had read,
and the verdict vLLM's log gives it):

    python3 scripts/record_vllm_fixtures.py --early-stop --cpus 1 --out tests/fixtures/vllm-0.32-cpu-early-stop
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
from scripts.repro_missed_close import classify, parse_log, parse_stop, run_clients

# (request id prefix, stop, requests, max_tokens): each batch at concurrency 2 (the server's two slots), one after
# another. A close 1 ms after the send comes before the route handler has given vLLM the request; a close
# 1.5 s after the send of a 16-token stream comes after it has ended (the client read nothing): both are real
# outcomes of an early stop that the log must tell apart from an abort.
EARLY_STOP_BATCHES = (
    ("es-send1", "send:1", 6, 64),
    ("es-headers", "headers", 6, 64),
    ("es-first", "first-token", 6, 64),
    ("es-tok5", "tokens:5", 6, 64),
    ("es-late", "send:1500", 4, 16),
    ("es-full", "none", 2, 16),
)

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


def _early_stop(out: Path, cpus: str | None, log_outputs: bool) -> dict:
    """One server, the batches of EARLY_STOP_BATCHES, its log and what the clients did."""
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "server.log"
    extra = ["--enable-log-outputs"] if log_outputs else []
    batches = []
    with RealVllm(log_path=log_path, max_num_seqs=2, cpus=cpus, extra_args=extra) as srv:
        time.sleep(1.0)
        gen0 = _generation_tokens(srv.url)
        records = []
        for prefix, stop, n, max_tokens in EARLY_STOP_BATCHES:
            got = run_clients(srv.port, parse_stop(stop), n, 2, max_tokens, prefix, deadline_s=60.0)
            records += got
            batches.append({"prefix": prefix, "stop": stop, "requests": n, "max_tokens": max_tokens})
            time.sleep(2.0)  # let a ran-on stream end, and the log catch up, before the next batch
        time.sleep(1.0)
        gen1 = _generation_tokens(srv.url)
        startup = srv.startup_s
    log = parse_log(log_path.read_text(errors="replace"))
    verdicts = classify(records, log)
    doc = {
        "vllm_args": ["--max-num-seqs", "2", "--enable-log-requests", *extra],
        "startup_s": startup,
        "epoch_offset": time.time() - time.monotonic(),  # add to a monotonic mark to get Unix time
        "generation_tokens_total_delta": gen1 - gen0,
        "batches": batches,
        "clients": [{"request_id": r.request_id, "vllm_request_id": "chatcmpl-" + r.request_id, "stop": r.stop,
                     "sent_mono": r.sent, "closed_mono": r.closed, "closed_early": not r.done,
                     "chunks_read": r.chunks, "tokens_read": r.tokens, "read_to_done": r.done, "error": r.error,
                     "verdict": verdicts[r.request_id],
                     "deltas_logged": log.deltas.get("chatcmpl-" + r.request_id) if log_outputs else None}
                    for r in records],
    }
    (out / "clients.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def _generation_tokens(url: str) -> float:
    name = "vllm:generation_tokens_total"
    return sum(float(line.rsplit(" ", 1)[1]) for line in _metrics(url).splitlines()
               if line.startswith((name + "{", name + " ")))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpus", default=None, help="pin the server we start to these CPUs (taskset -c)")
    p.add_argument("--out", default="tests/fixtures/vllm-0.32-cpu")
    p.add_argument("--url", help="record from this running server instead of starting one")
    p.add_argument("--log", help="that server's log file (stdout+stderr), copied to OUT/server.log")
    p.add_argument("--load", action="store_true", help="also record /metrics under load and after aborts")
    p.add_argument("--early-stop", action="store_true",
                   help="record early-stop logs (log-requests/ and log-outputs/ under --out) instead")
    args = p.parse_args()
    if args.early_stop:
        if args.url:
            p.error("--early-stop starts its own servers (it needs one with and one without --enable-log-outputs)")
        out = Path(args.out)
        for variant, log_outputs in (("log-requests", False), ("log-outputs", True)):
            doc = _early_stop(out / variant, args.cpus, log_outputs)
            counts: dict[str, int] = {}
            for c in doc["clients"]:
                counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
            print(variant, counts, "Δgeneration_tokens_total", doc["generation_tokens_total_delta"])
        return 0
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

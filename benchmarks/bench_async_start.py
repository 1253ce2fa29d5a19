"""Does a start of many async users at once stall the bridge loop? Ingress, TTFT and loop lag against the ledger.

    python benchmarks/bench_async_start.py [--stacks openai-async httpx-async] [--users 64 200] [--tokens 64]
                                           [--repeats 1] [--code-root DIR] [--json out.json]

Issue 21 measured OpenAIAsyncUser's first 64 requests reaching the server 3.8 s (p50) after their send stamp,
with the bridge loop lagging up to 6.2 s: every user built its own SDK client, and with it an SSL context
(~21 ms of CPU each, measured here), on the one loop. This benchmark repeats that start: N users of a stack,
all spawned at once, one stream of `--tokens` tokens each (benchmarks/run_users.py, a child process pinned to
CPU 1: the stack's own Locust user class, `on_start` and all), against the simulator (pinned to CPU 0,
`--ledger-send-times`, 10 ms steps, a slot for every user). Per stack and N, from the ledger joined by request
id (benchmarks/ledger_join.py): ingress (ledger arrival − the record's `sent`), the true TTFT, delivery
(first-token stamp − the ledger's `first_sent`) and the reported TTFT, p50/p99/max; the bridge loop's lag
p99 and max (5 ms sampling, from before the first user starts); client CPU.

`--code-root DIR` runs the users of another checkout (e.g. `git worktree add /tmp/before <commit>`) with this
benchmark, so before and after are measured by one script. Loopback only; every process it starts is stopped
by its PID; every run has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_tools import get_json, pin  # noqa: E402
from benchmarks.ledger_join import join, pct, summary  # noqa: E402
from stopstorm.simulator.launcher import EmbeddedSimulator  # noqa: E402

SIM_CPU, CLIENT_CPU = 0, 1
CHILD_TIMEOUT_S = 180.0




def reset_ledger(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url + "/stopstorm/ledger/reset", method="POST"), timeout=10).read()


def run_child(stack: str, url: str, users: int, tokens: int, code_root: Path | None, pinned: bool) -> dict[str, Any]:
    """One run_users.py process; its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    env = dict(os.environ)
    if code_root is not None:
        env["STOPSTORM_ROOT"] = str(code_root)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run_users.py"), "--stack", stack, "--url", url,
           "--users", str(users), "--tokens", str(tokens), "--out", str(out), "--timeout", str(CHILD_TIMEOUT_S - 30)]
    if pinned:
        cmd += ["--cpu", str(CLIENT_CPU)]
    try:
        subprocess.run(cmd, check=True, timeout=CHILD_TIMEOUT_S, env=env, cwd=str(code_root or ROOT))
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def measure(result: dict[str, Any], ledger_doc: dict[str, Any]) -> dict[str, Any]:
    ledger = {e["request_id"]: e for e in ledger_doc["requests"]}
    stamps = [{"id": f"chatcmpl-{r['request_id']}", "send": r["sent"], "first": r["first_token"],
               "reported_ttft": r["ttft"]} for r in result["records"] if not r["error"]]
    joined = join(stamps, ledger)
    row = summary(joined)
    for name in ("ingress", "reported", "delivery"):
        v = pct(joined[name], 1.0)
        row[f"{name}_max_ms"] = None if v is None else round(v * 1e3, 3)
    lag = result["self_monitor"].get("bridge_lag") or {}
    stalls = result.get("bridge_stalls") or []
    row.update({
        "stack": result["stack"], "users": result["users"], "streams": len(result["records"]),
        "failures": sum(1 for r in result["records"] if r["error"]), "unfinished_users": result["unfinished_users"],
        "bridge_lag_p99_ms": lag.get("p99_ms"), "bridge_lag_max_ms": lag.get("max_ms"),
        "worst_bridge_stall_ms": round(stalls[0][1] * 1e3, 1) if stalls else 0.0,
        "client_cpu_s": round(result["cpu_s"], 3), "wall_s": round(result["wall_s"], 3),
    })
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stacks", nargs="+", default=["openai-async", "httpx-async"])
    parser.add_argument("--users", type=int, nargs="+", default=[64, 200])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--step-base-ms", type=float, default=10.0)
    parser.add_argument("--code-root", type=Path, default=None, help="run the users of this checkout instead")
    parser.add_argument("--label", default="", help="a name for this run in the JSON (e.g. before, after)")
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args()

    pinned = (os.cpu_count() or 1) >= 2 and {SIM_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)
    sim = EmbeddedSimulator(["--ledger-send-times", "--max-num-seqs", str(max(args.users) + 8), "--step-base-ms",
                             str(args.step_base_ms), "--step-per-seq-ms", "0", "--prefill-per-token-ms", "0",
                             "--seed", "0"])
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        url = sim.start()
        if pinned:
            assert sim.pid is not None
            pin(sim.pid, SIM_CPU)
        code = args.code_root or ROOT
        head = subprocess.run(["git", "-C", str(code), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True, check=False).stdout.strip()
        print(f"async start benchmark ({args.label or 'unlabelled'}): code {code} at {head}; "
              + ("simulator on CPU 0, users on CPU 1" if pinned else "no pinning")
              + f"; {args.step_base_ms:g} ms steps, {args.tokens} tokens a stream", flush=True)
        for stack in args.stacks:
            for n in args.users:
                for rep in range(args.repeats):
                    reset_ledger(url)
                    result = run_child(stack, url, n, args.tokens, args.code_root, pinned)
                    time.sleep(0.3)
                    row = measure(result, get_json(url + "/stopstorm/ledger"))
                    row.update({"repeat": rep, "label": args.label, "code": head})
                    rows.append(row)
                    print(f"  {stack:12s} N={n:3d}: ingress p50 {row['ingress_p50_ms']} p99 {row['ingress_p99_ms']} "
                          f"max {row['ingress_max_ms']} ms; TTFT reported p99 {row['reported_p99_ms']} vs true p99 "
                          f"{row['true_p99_ms']} ms; delivery p99 {row['delivery_p99_ms']} ms; bridge lag p99 "
                          f"{row['bridge_lag_p99_ms']} max {row['bridge_lag_max_ms']} ms; failures "
                          f"{row['failures']}, joined {row['joined']}/{row['streams']}", flush=True)
    finally:
        sim.stop()
    print("\n| stack | users | ingress p50 / p99 / max ms | TTFT reported p50 / p99 ms | true p50 / p99 ms | "
          "delivery p50 / p99 ms | bridge lag p99 / max ms | client CPU s |")
    print("|---|---:|---|---|---|---|---|---:|")
    for r in rows:
        print(f"| {r['stack']} | {r['users']} | {r['ingress_p50_ms']} / {r['ingress_p99_ms']} / {r['ingress_max_ms']} "
              f"| {r['reported_p50_ms']} / {r['reported_p99_ms']} | {r['true_p50_ms']} / {r['true_p99_ms']} | "
              f"{r['delivery_p50_ms']} / {r['delivery_p99_ms']} | {r['bridge_lag_p99_ms']} / "
              f"{r['bridge_lag_max_ms']} | {r['client_cpu_s']} |")
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

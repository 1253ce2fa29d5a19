"""stopstorm's stacks side by side with AIPerf and GuideLLM on one simulator: client CPU per chunk, TTFT truth.

    python benchmarks/bench_peers.py [--tools requests fasthttp openai-async aiperf guidellm] [--streams 64]
                                     [--tokens 64] [--waves 3] [--repeats 3] [--json benchmarks/results/raw/peers.json]

Every tool keeps `--streams` streams in flight (a closed loop at fixed concurrency: AIPerf `--concurrency`,
GuideLLM `concurrent` streams, stopstorm that many users back to back) for `--waves` × `--streams` requests of
`--tokens` tokens (ignore_eos), against one simulator (`--ledger-send-times`, 10 ms steps, one token a chunk,
no per-sequence or prefill cost, a slot for everyone), the simulator pinned to CPU 0 and the tool, every
process and thread of it, to CPU 1. Per run, from the ledger (server truth) joined by request id:

- how each tool names its requests: stopstorm and AIPerf send `X-Request-Id` (AIPerf a uuid4 per request,
  kept in its per-record export as `x_request_id`), which the simulator makes its id (`chatcmpl-<id>`);
  GuideLLM 0.8.1 sends no request id, but keeps the server's own id from the chunks (`response_id`);
- TTFT as the tool reports it, the true TTFT (ledger `first_sent − arrival`), delivery (the tool's first-token
  stamp − `first_sent`) and ingress (`arrival` − the tool's send stamp), p50/p99 (benchmarks/ledger_join.py);
- client CPU per chunk: the CPU time of the tool's whole process tree (sampled every 50 ms from /proc) over
  the ledger's load window (first arrival to last stream freed), divided by the chunks the server sent in it.
  Work a tool defers past its last stream (AIPerf's record processors, GuideLLM's statistics) is not counted.

Each figure is the median over `--repeats` runs; ratios are against the best peer's median. The peers are
installed (pinned versions, `pip`, their own venvs under ~/.cache/stopstorm/peers) before anything runs, with
a local byte-level BPE tokenizer built there from the interpreter's own sources (as scripts/real_vllm.py
builds one), so nothing is downloaded at run time; a peer that cannot be installed or run is reported as such,
with why, in the output and the JSON. Loopback only; every process is stopped by its PID; every run has a
timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.ledger_join import join, summary, wall_to_monotonic  # noqa: E402
from stopstorm.simulator.launcher import EmbeddedSimulator  # noqa: E402

SIM_CPU, TOOL_CPU = 0, 1
PEERS_DIR = Path.home() / ".cache" / "stopstorm" / "peers"
PEERS = {"aiperf": "aiperf==0.13.0", "guidellm": "guidellm==0.8.1"}
STOPSTORM_TOOLS = ("requests", "fasthttp", "httpx-async", "openai-async", "openai", "httpx")
RUN_TIMEOUT_S = 300.0
SAMPLE_S = 0.05
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Runs in a peer's venv (tokenizers and transformers come with both peers). argv: OUT_DIR
_BUILD_TOKENIZER = r"""
import glob, os, sys, sysconfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
out = sys.argv[1]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
def texts(limit=1_000_000):  # local text only: the interpreter's own stdlib sources
    n = 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        try:
            s = open(path, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError):
            continue
        yield s
        n += len(s)
        if n >= limit:
            break
tok = Tokenizer(models.BPE(unk_token=None))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(texts(), trainer=trainers.BpeTrainer(vocab_size=2000, special_tokens=SPECIALS,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                               unk_token="<unk>", model_max_length=4096)
fast.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
                      "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
fast.save_pretrained(out)
open(os.path.join(out, ".stopstorm-ok"), "w").write("ok\n")
"""


# -- installing the peers --------------------------------------------------------------------------------------


def installed_version(name: str) -> str | None:
    py = PEERS_DIR / name / "bin" / "python"
    if not py.exists():
        return None
    r = subprocess.run([str(py), "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
                       capture_output=True, text=True, timeout=60, check=False)
    return r.stdout.strip() or None


def ensure_peer(name: str) -> tuple[str | None, str | None]:
    """(version, None) once `name` is installed at its pinned version, or (None, why not)."""
    spec = PEERS[name]
    want = spec.split("==")[1]
    if installed_version(name) == want:
        return want, None
    venv = PEERS_DIR / name
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    print(f"installing {spec} into {venv} (pip) ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
        r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", spec], capture_output=True, text=True,
                           timeout=1800, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"could not create its venv: {exc}"
    if r.returncode != 0:
        tail = " | ".join(line for line in r.stderr.splitlines() if "is ignored" not in line)[-600:]
        return None, f"pip install {spec} failed (exit {r.returncode}): {tail}"
    got = installed_version(name)
    return (got, None) if got == want else (None, f"pip installed {got!r}, not {want}")


def ensure_tokenizer(python: Path) -> Path:
    out = PEERS_DIR / "tokenizer"
    if not (out / ".stopstorm-ok").exists():
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(python), "-c", _BUILD_TOKENIZER, str(out)], check=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    return out


# -- measuring a process tree's CPU ----------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, user+system CPU seconds) of one process, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


class TreeCpu:
    """CPU seconds of a process and all its descendants over time, sampled every SAMPLE_S from /proc.

    A descendant that has exited is still counted: its last sample stays in the total (and once its parent
    reaps it, the parent's cutime holds it, which /proc's utime/stime do not include, so nothing counts twice).
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.last: dict[int, float] = {}
        self.samples: list[tuple[float, float]] = []  # (monotonic, total CPU s)
        self._scan = 0.0

    def _descendants(self) -> set[int]:
        kids: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                st = _stat(int(entry))
                if st is not None:
                    kids.setdefault(st[0], []).append(int(entry))
        out, todo = set(), [self.root]
        while todo:
            pid = todo.pop()
            out.add(pid)
            todo.extend(kids.get(pid, []))
        return out

    def sample(self) -> None:
        now = time.monotonic()
        if now - self._scan > 0.5 or not self.last:
            for pid in self._descendants():
                self.last.setdefault(pid, 0.0)
            self._scan = now
        for pid in list(self.last):
            st = _stat(pid)
            if st is not None:
                self.last[pid] = st[1]
        self.samples.append((now, sum(self.last.values())))

    def at(self, t: float) -> float | None:
        """The tree's CPU total at monotonic time t, interpolated between samples."""
        s = self.samples
        if not s or t < s[0][0] or t > s[-1][0]:
            return None
        for (t0, c0), (t1, c1) in itertools.pairwise(s):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)
        return s[-1][1]


def run_tool(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: float = RUN_TIMEOUT_S) -> tuple[int, TreeCpu, str]:
    """Run `cmd` pinned to TOOL_CPU (taskset, before its first instruction), sampling its tree's CPU."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(["taskset", "-c", str(TOOL_CPU), *cmd], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True)
        cpu = _watch(proc, timeout, cmd[0])
        log.seek(0)
        return proc.returncode, cpu, log.read().decode("utf-8", "replace")[-4000:]


def _watch(proc: subprocess.Popen[bytes], timeout: float, name: str) -> TreeCpu:
    """Sample `proc`'s tree until it exits; past `timeout`, stop its session (the tool and its children)."""
    cpu = TreeCpu(proc.pid)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            cpu.sample()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} ran past {timeout:.0f} s")
            time.sleep(SAMPLE_S)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: the tool and its children only
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return cpu


# -- the tools -------------------------------------------------------------------------------------------------


def run_stopstorm(stack: str, url: str, args: argparse.Namespace, work: Path,
                  ledger_doc: Callable[[], dict[str, Any]]) -> tuple[list[dict[str, Any]], TreeCpu]:
    out = work / f"{stack}.json"
    rc, cpu, log = run_tool([sys.executable, str(ROOT / "benchmarks" / "run_users.py"), "--stack", stack, "--url", url,
                             "--users", str(args.streams), "--streams-per-user", str(args.waves), "--tokens",
                             str(args.tokens), "--out", str(out), "--timeout", str(RUN_TIMEOUT_S - 30)])
    if rc != 0:
        raise RuntimeError(f"run_users.py exited {rc}: {log[-1500:]}")
    result = json.loads(out.read_text())
    # TTFT's start as the record has it: the request's write where the stack stamps it (users/socket_stamps.py)
    stamps = [{"id": f"chatcmpl-{r['request_id']}", "send": r["sent"] if r.get("written") is None else r["written"],
               "first": r["first_token"],
               "reported_ttft": r["ttft"]} for r in result["records"] if not r["error"]]
    return stamps, cpu


def run_aiperf(url: str, args: argparse.Namespace, work: Path,
               ledger_doc: Callable[[], dict[str, Any]]) -> tuple[list[dict[str, Any]], TreeCpu]:
    art = work / "aiperf"
    cmd = [str(PEERS_DIR / "aiperf" / "bin" / "aiperf"), "profile", "--model", "llm", "--url", url,
           "--endpoint-type", "chat", "--streaming", "--concurrency", str(args.streams), "--request-count",
           str(args.streams * args.waves), "--tokenizer", str(args.tokenizer), "--isl", "32", "--osl",
           str(args.tokens), "--extra-inputs", "ignore_eos:true", "--use-server-token-count", "--ui", "none",
           "--artifact-dir", str(art), "--export-level", "records", "--no-server-metrics", "--no-gpu-telemetry",
           "--random-seed", "0", "--workers-max", "1"]
    # Not HF_HUB_OFFLINE: AIPerf 0.13 then resolves every tokenizer name, a local path too, as a hub repo id
    # and fails; a local path is loaded from disk without it (no request leaves the host: measured).
    rc, cpu, log = run_tool(cmd, env={**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1"})
    if rc != 0:
        raise RuntimeError(f"aiperf exited {rc}: {log[-1500:]}")
    doc = ledger_doc()
    stamps = []
    for line in (art / "profile_export.jsonl").read_text().splitlines():
        rec = json.loads(line)
        meta, metrics = rec["metadata"], rec["metrics"]
        ttft = (metrics.get("time_to_first_token") or {}).get("value")
        send = wall_to_monotonic(meta["request_start_ns"] / 1e9, doc)
        # AIPerf stamps with perf_counter_ns (CLOCK_MONOTONIC on Linux) and pairs one time_ns with the start;
        # its TTFT is perf-counter time, so the first token is the start plus it.
        stamps.append({"id": f"chatcmpl-{meta['x_request_id']}", "send": send,
                       "first": None if ttft is None else send + ttft / 1e3,
                       "reported_ttft": None if ttft is None else ttft / 1e3})
    return stamps, cpu


def run_guidellm(url: str, args: argparse.Namespace, work: Path,
                 ledger_doc: Callable[[], dict[str, Any]]) -> tuple[list[dict[str, Any]], TreeCpu]:
    out = work / "guidellm.json"
    cmd = [str(PEERS_DIR / "guidellm" / "bin" / "guidellm"), "run",
           "--backend", f"kind=openai_http,target={url},model=llm,request_format=/v1/chat/completions",
           "--profile", f"kind=concurrent,streams={args.streams}",
           "--constraint", f"kind=max_requests,count={args.streams * args.waves}",
           "--data", f"kind=synthetic_text,prompt_tokens=32,output_tokens={args.tokens}",
           "--tokenizer", f"kind=huggingface_auto,model={args.tokenizer}",
           "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    rc, cpu, log = run_tool(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
    if rc != 0:
        raise RuntimeError(f"guidellm exited {rc}: {log[-1500:]}")
    doc = ledger_doc()
    stamps = []
    for bench in json.loads(out.read_text())["benchmarks"]:
        for req in bench["requests"]["successful"]:
            t = req["info"]["timings"]
            # Wall clock (time.time()); request_start is re-stamped by an httpx trace hook as the headers'
            # write begins, first_token_iteration as the first content line comes out of aiter_lines.
            stamps.append({"id": req["response_id"], "send": wall_to_monotonic(t["request_start"], doc),
                           "first": None if t.get("first_token_iteration") is None
                           else wall_to_monotonic(t["first_token_iteration"], doc),
                           "reported_ttft": None if req.get("time_to_first_token_ms") is None
                           else req["time_to_first_token_ms"] / 1e3})
    return stamps, cpu


# -- one run, figures ------------------------------------------------------------------------------------------


def figures(stamps: list[dict[str, Any]], cpu: TreeCpu, doc: dict[str, Any]) -> dict[str, Any]:
    entries = [e for e in doc["requests"] if e.get("status_code", 200) == 200]
    ledger = {e["request_id"]: e for e in entries}
    row = summary(join(stamps, ledger))
    chunks = sum(len(e.get("send_times") or []) for e in entries)
    start = min(e["arrival"] for e in entries)
    end = max(e["freed"] for e in entries if e.get("freed") is not None)
    c0, c1 = cpu.at(start), cpu.at(end)
    row.update({"requests": len(entries), "chunks": chunks, "load_s": round(end - start, 3),
                "cpu_s": None if c0 is None or c1 is None else round(c1 - c0, 4)})
    row["cpu_us_per_chunk"] = (None if row["cpu_s"] is None or not chunks else round(row["cpu_s"] / chunks * 1e6, 1))
    row["ttft_error_p50_ms"] = _diff(row, "reported_p50_ms", "true_p50_ms")
    row["ttft_error_p99_ms"] = _diff(row, "reported_p99_ms", "true_p99_ms")
    return row


def _diff(row: dict[str, Any], a: str, b: str) -> float | None:
    return None if row.get(a) is None or row.get(b) is None else round(row[a] - row[b], 3)


NUMERIC = ("cpu_us_per_chunk", "reported_p50_ms", "reported_p99_ms", "true_p50_ms", "true_p99_ms",
           "delivery_p50_ms", "delivery_p99_ms", "ingress_p50_ms", "ingress_p99_ms", "ttft_error_p50_ms",
           "ttft_error_p99_ms", "load_s", "chunks", "joined", "unjoined")


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in NUMERIC:
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = round(statistics.median(vals), 3) if vals else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tools", nargs="+", default=["requests", "fasthttp", "openai-async", "aiperf", "guidellm"],
                        choices=[*STOPSTORM_TOOLS, *PEERS])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--waves", type=int, default=3, help="requests per stream slot (default 3)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-base-ms", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "peers.json")
    args = parser.parse_args()

    peers: dict[str, dict[str, Any]] = {}
    for name in (t for t in args.tools if t in PEERS):
        version, why = ensure_peer(name)
        peers[name] = {"version": version, "install": f"pip install {PEERS[name]} in ~/.cache/stopstorm/peers/{name}",
                       "unavailable": why}
        if why:
            print(f"\n!!! {name} CANNOT BE MEASURED HERE: {why}\n", flush=True)
    ready = [n for n, p in peers.items() if not p["unavailable"]]
    args.tokenizer = ensure_tokenizer(PEERS_DIR / ready[0] / "bin" / "python") if ready else None

    pinned = (os.cpu_count() or 1) >= 2 and {SIM_CPU, TOOL_CPU} <= os.sched_getaffinity(0)
    if not pinned:
        print("!!! fewer than 2 CPUs usable: tools and simulator are not pinned; CPU figures are not comparable")
    sim = EmbeddedSimulator(["--ledger-send-times", "--max-num-seqs", str(args.streams + 16), "--step-base-ms",
                             str(args.step_base_ms), "--step-per-seq-ms", "0", "--prefill-per-token-ms", "0",
                             "--seed", "0"])
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in args.tools}
    errors: dict[str, list[str]] = {t: [] for t in args.tools}
    started = time.monotonic()
    try:
        url = sim.start()
        assert sim.pid is not None
        if pinned:
            for tid in os.listdir(f"/proc/{sim.pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), {SIM_CPU})
            os.sched_setaffinity(0, {SIM_CPU})  # this process only samples /proc: it stays off the tools' core

        def ledger_doc() -> dict[str, Any]:
            with urllib.request.urlopen(url + "/stopstorm/ledger", timeout=30) as r:
                return json.loads(r.read())

        print(f"peers benchmark: {args.streams} streams × {args.waves} waves × {args.tokens} tokens, "
              f"{args.step_base_ms:g} ms steps; simulator CPU {SIM_CPU}, tools CPU {TOOL_CPU}; load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        for rep in range(args.repeats):
            for tool in args.tools:
                if tool in peers and peers[tool]["unavailable"]:
                    continue
                urllib.request.urlopen(urllib.request.Request(url + "/stopstorm/ledger/reset", method="POST"),
                                       timeout=10).read()
                with tempfile.TemporaryDirectory() as tmp:
                    try:
                        if tool == "aiperf":
                            stamps, cpu = run_aiperf(url, args, Path(tmp), ledger_doc)
                        elif tool == "guidellm":
                            stamps, cpu = run_guidellm(url, args, Path(tmp), ledger_doc)
                        else:
                            stamps, cpu = run_stopstorm(tool, url, args, Path(tmp), ledger_doc)
                        time.sleep(0.3)
                        row = figures(stamps, cpu, ledger_doc())
                    except Exception as exc:
                        errors[tool].append(f"{type(exc).__name__}: {exc}"[:2000])
                        print(f"\n!!! {tool} run {rep + 1} FAILED: {errors[tool][-1]}\n", flush=True)
                        continue
                row["repeat"] = rep
                runs[tool].append(row)
                print(f"  run {rep + 1} {tool:12s}: CPU {row['cpu_us_per_chunk']} µs/chunk ({row['chunks']} chunks in "
                      f"{row['load_s']} s); TTFT reported p50/p99 {row['reported_p50_ms']} / {row['reported_p99_ms']}"
                      f" ms, true {row['true_p50_ms']} / {row['true_p99_ms']}, delivery {row['delivery_p50_ms']} / "
                      f"{row['delivery_p99_ms']}, ingress {row['ingress_p50_ms']} / {row['ingress_p99_ms']} ms; "
                      f"joined {row['joined']}/{row['joined'] + row['unjoined']}", flush=True)
    finally:
        sim.stop()

    medians = {t: median_row(r) for t, r in runs.items() if r}
    best = {k: min((medians[p][k] for p in medians if p in PEERS and medians[p].get(k) is not None), default=None)
            for k in ("cpu_us_per_chunk", "delivery_p99_ms", "ingress_p99_ms", "ttft_error_p99_ms")}
    for m in medians.values():
        m["ratios_to_best_peer"] = {k: (None if best[k] in (None, 0) or m.get(k) is None else round(m[k] / best[k], 2))
                                    for k in best}

    print(f"\nmedian of {args.repeats} (ms unless said; ratios: against the best peer's median)\n")
    print("| tool | client CPU µs / chunk (× best peer) | TTFT reported p50 / p99 | true (ledger) p50 / p99 | "
          "delivery error p50 / p99 (× best peer) | ingress p50 / p99 | runs |")
    print("|---|---:|---|---|---|---|---:|")
    for t in args.tools:
        if t in peers and peers[t]["unavailable"]:
            print(f"| {t} | not measured: {peers[t]['unavailable'][:200]} | | | | | 0 |")
            continue
        if t not in medians:
            print(f"| {t} | every run failed: {(errors[t] or ['?'])[-1][:200]} | | | | | 0 |")
            continue
        m, r = medians[t], medians[t]["ratios_to_best_peer"]
        name = f"{t} {peers[t]['version']}" if t in peers else f"stopstorm {t}"
        print(f"| {name} | {m['cpu_us_per_chunk']} ({r['cpu_us_per_chunk']}×) | {m['reported_p50_ms']} / "
              f"{m['reported_p99_ms']} | {m['true_p50_ms']} / {m['true_p99_ms']} | {m['delivery_p50_ms']} / "
              f"{m['delivery_p99_ms']} ({r['delivery_p99_ms']}×) | {m['ingress_p50_ms']} / {m['ingress_p99_ms']} | "
              f"{len(runs[t])} |")
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    doc = {"schema": 1, "command": " ".join(sys.argv), "cpus": os.cpu_count(), "pinned": pinned,
           "load_average_at_end": os.getloadavg(), "settings": {k: v for k, v in vars(args).items()
                                                                if k not in ("json", "tokenizer")},
           "peers": peers, "medians": medians, "runs": runs, "errors": errors}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

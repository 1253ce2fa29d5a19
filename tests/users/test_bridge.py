"""users.bridge: greenlets running asyncio coroutines through one loop thread.

The gevent scenarios run in a fresh interpreter that monkey-patches first, exactly as a locustfile does,
so this module never patches the pytest process. Each scenario prints one JSON line that the test reads.
The in-process tests use the bridge from plain (unpatched) threads, which it also supports.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import ROOT

from stopstorm.users.bridge import AsyncBridge, BridgeClosedError, _InlineExecutor, get_bridge

LOOPS = ["uvloop", "stock"]

# A child process that patches like a locustfile, then builds a bridge with the loop asked for in argv[1].
PRELUDE = """
from gevent import monkey
monkey.patch_all()

import asyncio, json, os, sys, time
import gevent
from stopstorm.users.bridge import AsyncBridge, get_bridge

LOOP_KIND = sys.argv[1] if len(sys.argv) > 1 else "uvloop"
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 0

def make_bridge():
    return AsyncBridge(use_uvloop=(LOOP_KIND == "uvloop"))

def emit(**kw):
    print("RESULT " + json.dumps(kw), flush=True)
"""

# The tiny local HTTP server the DNS/openai scenarios talk to: a real process, loopback only.
SERVER = """
import http.server, json, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            body = json.dumps({"object": "list", "data": []}).encode()
            ctype = "application/json"
        else:
            body, ctype = b"hello from localhost", "text/plain"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def run_scenario(body: str, *args: object, timeout: float = 30.0) -> dict:
    """Run PRELUDE + body in a fresh interpreter; return the JSON of its `RESULT` line."""
    code = PRELUDE + textwrap.dedent(body)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"scenario failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def local_server() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


# --- under gevent monkey patching, in a child interpreter --------------------------------------------------


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_greenlets_run_concurrently(loop_kind):
    out = run_scenario("""
        bridge = make_bridge()
        t0 = time.monotonic()
        greenlets = [gevent.spawn(bridge.run, lambda i=i: asyncio.sleep(0.2, result=i)) for i in range(50)]
        gevent.joinall(greenlets, timeout=8, raise_error=True)
        elapsed = time.monotonic() - t0
        emit(elapsed=elapsed, values=[g.value for g in greenlets], loop=type(bridge.loop).__module__)
        bridge.close()
    """, loop_kind)
    assert out["values"] == list(range(50))
    assert out["elapsed"] < 1.0, f"50 × 0.2 s took {out['elapsed']:.2f} s: the greenlets were not concurrent"
    assert out["loop"].startswith("uvloop" if loop_kind == "uvloop" else "asyncio")


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_values_and_exceptions_propagate(loop_kind):
    out = run_scenario("""
        import traceback
        bridge = make_bridge()

        async def fail():
            await asyncio.sleep(0.01)
            raise KeyError("inside the coroutine")

        async def in_loop():
            return asyncio.get_running_loop() is bridge.loop

        try:
            bridge.run(fail)
        except KeyError as exc:
            caught, tb = repr(exc), "".join(traceback.format_exception(exc))
        other = gevent.spawn(bridge.run, lambda: asyncio.sleep(0.01, result={"a": [1, 2]}))
        try:
            bridge.run(lambda: 1 / 0)  # coro_fn itself raising, before any awaitable exists
        except ZeroDivisionError as exc:
            sync_error = type(exc).__name__
        emit(caught=caught, coroutine_in_tb="in fail" in tb, value=other.get(timeout=5), in_loop=bridge.run(in_loop),
             plain=bridge.run(lambda: 42), sync_error=sync_error)
        bridge.close()
    """, loop_kind)
    assert out["caught"] == "KeyError('inside the coroutine')"
    assert out["coroutine_in_tb"], "the coroutine's own frame should be in the re-raised traceback"
    assert out["value"] == {"a": [1, 2]}
    assert out["in_loop"] is True
    assert out["plain"] == 42
    assert out["sync_error"] == "ZeroDivisionError"


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_killed_greenlet_cancels_its_task(loop_kind):
    out = run_scenario("""
        bridge = make_bridge()
        seen = []

        async def stream():
            try:
                seen.append("started")
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            finally:
                await asyncio.sleep(0.01)  # an async cleanup, as closing a stream is
                seen.append("finally")

        g = gevent.spawn(bridge.run, stream)
        gevent.sleep(0.1)
        t0 = time.monotonic()
        g.kill(block=True, timeout=5)
        emit(seen=seen, kill_s=time.monotonic() - t0, dead=g.dead, exc=repr(g.exception),
             tasks=bridge.run(lambda: len(asyncio.all_tasks())))
        bridge.close()
    """, loop_kind)
    assert out["seen"] == ["started", "cancelled", "finally"], out
    assert out["dead"] is True
    assert out["exc"] == "None"  # GreenletExit counts as a clean exit in gevent
    assert out["kill_s"] < 1.0
    assert out["tasks"] == 0  # nothing is left running on the loop


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_timeouts_cancel_the_task(loop_kind):
    out = run_scenario("""
        bridge = make_bridge()
        seen = []

        async def stream():
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            finally:
                seen.append("finally")

        t0 = time.monotonic()
        try:
            with gevent.Timeout(0.1):
                bridge.run(stream)
        except gevent.Timeout as exc:
            outer = type(exc).__name__
        outer_s, outer_seen = time.monotonic() - t0, list(seen)
        seen.clear()
        t0 = time.monotonic()
        try:
            bridge.run(stream, timeout=0.1)
        except TimeoutError as exc:
            own = type(exc).__name__
        emit(outer=outer, outer_s=outer_s, outer_seen=outer_seen, own=own, own_s=time.monotonic() - t0,
             own_seen=seen)
        bridge.close()
    """, loop_kind)
    assert out["outer"] == "Timeout" and out["outer_seen"] == ["cancelled", "finally"]
    assert out["own"] == "TimeoutError" and out["own_seen"] == ["cancelled", "finally"]
    assert 0.09 < out["outer_s"] < 1.0 and 0.09 < out["own_s"] < 1.0


def test_kill_before_the_coroutine_starts():
    out = run_scenario("""
        bridge = make_bridge()
        started = []

        async def never():
            started.append(1)
            await asyncio.sleep(30)

        outcomes = []
        for _ in range(50):
            g = gevent.spawn(bridge.run, never)
            gevent.sleep(0)  # run() has queued its start; the loop may not have taken it yet
            g.kill(block=True, timeout=3)
            outcomes.append(g.dead)
        emit(all_dead=all(outcomes), left=bridge.run(lambda: len(asyncio.all_tasks())), started=len(started))
        bridge.close()
    """)
    assert out["all_dead"] and out["left"] == 0
    assert out["started"] <= 50


def test_killing_a_streaming_greenlet_aborts_the_request_on_the_server():
    """The point of cancelling: `async with client.stream(...)` closes the connection and the server aborts."""
    out = run_scenario("""
        import httpx, json, urllib.request
        from stopstorm.simulator.launcher import EmbeddedSimulator

        body = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "max_tokens": 500}
        with EmbeddedSimulator(["--step-base-ms", "5", "--output-len", "fixed:500"]) as sim:
            bridge = make_bridge()
            client = bridge.run(lambda: httpx.AsyncClient(timeout=10, trust_env=False))
            chunks = []

            async def stream():
                async with client.stream("POST", f"{sim.url}/v1/chat/completions", json=body,
                                         headers={"X-Request-Id": "bridge-kill"}) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: "):
                            chunks.append(line)

            g = gevent.spawn(bridge.run, stream)
            with gevent.Timeout(10):
                while len(chunks) < 5:
                    gevent.sleep(0.005)
            stopped = time.monotonic()
            g.kill(block=True, timeout=5)
            gevent.sleep(0.1)
            with urllib.request.urlopen(f"{sim.url}/stopstorm/ledger/chatcmpl-bridge-kill", timeout=5) as r:
                entry = json.loads(r.read())
            bridge.run(client.aclose)
            bridge.close()
        emit(finish=entry["finish_reason"], generated=entry["generated_tokens"],
             seen_after_ms=(entry["disconnect_seen"] - stopped) * 1000 if entry["disconnect_seen"] else None)
    """, timeout=60)
    assert out["finish"] == "abort"
    assert out["generated"] < 100
    assert out["seen_after_ms"] is not None and out["seen_after_ms"] < 100


def test_a_task_ignoring_cancellation_is_given_up_after_cancel_wait():
    out = run_scenario("""
        bridge = AsyncBridge(cancel_wait=0.2)

        async def stubborn():
            for _ in range(3):
                try:
                    await asyncio.sleep(0.5)
                except asyncio.CancelledError:
                    pass
            return "done"

        t0 = time.monotonic()
        try:
            bridge.run(stubborn, timeout=0.1)
        except TimeoutError:
            pass
        waited = time.monotonic() - t0
        emit(waited=waited, after=bridge.run(lambda: asyncio.sleep(0, result="ok")))
        bridge.close(timeout=3)
    """)
    assert 0.25 < out["waited"] < 1.0
    assert out["after"] == "ok"


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_dns_and_executor_work_inside_the_loop(loop_kind, local_server):
    out = run_scenario("""
        import socket
        import httpx
        bridge = make_bridge()

        async def get():
            async with httpx.AsyncClient(timeout=5) as client:
                resp = await client.get(f"http://localhost:{PORT}/")
                return resp.status_code, resp.text

        async def resolve():
            loop = asyncio.get_running_loop()
            via_executor = await loop.run_in_executor(None, socket.getaddrinfo, "localhost", PORT)
            via_to_thread = await asyncio.to_thread(socket.gethostbyname, "localhost")
            via_loop = await loop.getaddrinfo("localhost", PORT)
            return len(via_executor) > 0, via_to_thread, len(via_loop) > 0

        with gevent.Timeout(15):
            results = gevent.joinall([gevent.spawn(bridge.run, get) for _ in range(5)], raise_error=True)
            emit(gets=[g.value for g in results], resolved=bridge.run(resolve, timeout=10))
        bridge.close()
    """, loop_kind, local_server)
    assert out["gets"] == [[200, "hello from localhost"]] * 5
    ok_executor, address, ok_loop = out["resolved"]
    assert ok_executor and ok_loop and address.startswith("127.")


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_openai_async_client_inside_the_loop(loop_kind, local_server):
    out = run_scenario("""
        import openai
        bridge = make_bridge()
        client = bridge.run(lambda: openai.AsyncOpenAI(base_url=f"http://localhost:{PORT}/v1", api_key="x",
                                                       max_retries=0, timeout=5))

        async def models():
            page = await client.models.list()
            return [m.id for m in page.data]

        with gevent.Timeout(20):
            listed = [g.value for g in gevent.joinall([gevent.spawn(bridge.run, models) for _ in range(3)],
                                                      raise_error=True)]
            bridge.run(client.close)
        emit(listed=listed)
        bridge.close()
    """, loop_kind, local_server)
    assert out["listed"] == [[], [], []]


def test_forked_child_gets_a_fresh_bridge():
    out = run_scenario("""
        parent = get_bridge()
        assert parent.run(lambda: asyncio.sleep(0, result=1)) == 1
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                child = get_bridge()
                t0 = time.monotonic()
                gs = [gevent.spawn(child.run, lambda: asyncio.sleep(0.1, result=os.getpid())) for _ in range(20)]
                gevent.joinall(gs, timeout=5, raise_error=True)
                try:
                    parent.run(lambda: asyncio.sleep(0))
                    stale = "ran"
                except Exception as exc:
                    stale = type(exc).__name__
                report = dict(fresh=child is not parent, pid_ok=child.pid == os.getpid(),
                              values_ok=all(g.value == os.getpid() for g in gs), elapsed=time.monotonic() - t0,
                              stale=stale)
                os.write(write_fd, json.dumps(report).encode())
            finally:
                os._exit(0)
        os.close(write_fd)
        deadline = time.monotonic() + 10
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                break
            gevent.sleep(0.02)
        data = os.read(read_fd, 65536)
        child_report = json.loads(data) if data else None
        emit(child=child_report, parent_still_works=parent.run(lambda: asyncio.sleep(0.01, result="yes")),
             same_in_parent=get_bridge() is parent)
    """)
    child = out["child"]
    assert child is not None, "the child did not report"
    assert child["fresh"] and child["pid_ok"] and child["values_ok"]
    assert child["elapsed"] < 1.0
    assert child["stale"] == "BridgeClosedError"
    assert out["parent_still_works"] == "yes" and out["same_in_parent"]


def test_close_fails_pending_and_later_calls():
    out = run_scenario("""
        bridge = make_bridge()
        pending = gevent.spawn(bridge.run, lambda: asyncio.sleep(30))
        gevent.sleep(0.05)
        t0 = time.monotonic()
        bridge.close(timeout=3)
        pending.join(timeout=3)
        try:
            bridge.run(lambda: asyncio.sleep(0))
            later = "ran"
        except Exception as exc:
            later = type(exc).__name__
        emit(close_s=time.monotonic() - t0, pending=type(pending.exception).__name__, later=later,
             loop_closed=bridge.loop.is_closed())
    """)
    assert out["pending"] == "BridgeClosedError"
    assert out["later"] == "BridgeClosedError"
    assert out["loop_closed"] is True
    assert out["close_s"] < 2.0


def test_a_thread_pool_executor_would_hang_under_patching():
    """Why the inline executor exists: under patch_all a stock pool's worker is a greenlet of a hub in the loop's
    thread, which only runs while that thread blocks through gevent. The first calls get through (starting the
    worker blocks there), later ones hang; so does the process's exit, joining that worker: hence os._exit."""
    out = run_scenario("""
        import concurrent.futures
        bridge = make_bridge()

        async def probe():
            loop = asyncio.get_running_loop()
            pool = concurrent.futures.ThreadPoolExecutor(1)
            outcomes = []
            for _ in range(5):
                try:
                    await asyncio.wait_for(loop.run_in_executor(pool, lambda: 1), 0.3)
                    outcomes.append("ran")
                except asyncio.TimeoutError:
                    outcomes.append("hung")
            return outcomes

        emit(stock_pool=bridge.run(probe, timeout=5),
             inline=[bridge.run(lambda: asyncio.to_thread(lambda: "ran"), timeout=5) for _ in range(5)])
        os._exit(0)
    """, timeout=20)
    assert "hung" in out["stock_pool"]
    assert out["inline"] == ["ran"] * 5


# --- in this (unpatched) process: plain threads as callers ------------------------------------------------


def test_inline_executor_runs_at_once_in_the_calling_thread():
    executor = _InlineExecutor()
    assert executor.submit(threading.get_ident).result(timeout=0) == threading.get_ident()
    failed = executor.submit(lambda: 1 / 0)
    assert failed.done() and isinstance(failed.exception(timeout=0), ZeroDivisionError)
    executor.shutdown(wait=True)


def test_plain_threads_share_the_singleton_and_run_concurrently():
    bridges: list[AsyncBridge] = []
    results: list[object] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        bridge = get_bridge()
        value = bridge.run(lambda: asyncio.sleep(0.2, result=i), timeout=5)
        with lock:
            bridges.append(bridge)
            results.append(value)

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert time.monotonic() - t0 < 1.5
    assert sorted(results) == list(range(8))
    assert len({id(b) for b in bridges}) == 1 and bridges[0] is get_bridge()


def test_run_from_inside_the_loop_is_refused():
    bridge = AsyncBridge()
    try:
        async def nested() -> None:
            bridge.run(lambda: asyncio.sleep(0))

        with pytest.raises(RuntimeError, match="own loop thread"):
            bridge.run(nested, timeout=5)
    finally:
        bridge.close(timeout=3)
    with pytest.raises(BridgeClosedError):
        bridge.run(lambda: asyncio.sleep(0))

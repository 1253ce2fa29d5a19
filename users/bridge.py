"""One bridge from gevent greenlets to asyncio coroutines: how the async client stacks run under Locust.

Locust runs every user as a gevent greenlet in a monkey-patched process, while `httpx.AsyncClient` and
`openai.AsyncOpenAI` need an asyncio event loop. What was measured (DESIGN.md §6) decides the shape:

- `asyncio.run` per greenlet fails: only the first one works, so greenlets cannot each own a loop.
- What works is ONE asyncio loop (uvloop when importable, else the stock loop) in ONE real OS thread per
  process. The thread is started through gevent's original `_thread.start_new_thread`; a patched
  `threading.Thread` would be just another greenlet and block the hub as soon as the loop waits for I/O.
- The loop's default executor is replaced by an inline one that runs the function at once in the loop's
  thread. A stock thread pool there creates "threads" that, under monkey patching, are greenlets of a hub
  in the loop's thread that never runs: DNS lookups (`run_in_executor(None, getaddrinfo)`) and the openai
  SDK's platform probe (`asyncio.to_thread`) hang forever. Those calls are short, so running them inline
  costs the loop little.
- A greenlet waits on a gevent `AsyncResult` set from its own hub: a hub `loop.async_()` watcher, whose
  thread-safe `send()` the loop thread calls when the coroutine is done, wakes the hub, which then sets the
  result. The hub never blocks on anything from the other thread, and other greenlets keep running.
- When the waiting greenlet is interrupted (killed with `GreenletExit` as Locust stops a user, or a
  `gevent.Timeout`), the asyncio task is cancelled so `async with` blocks close their streams (the server
  sees the close and aborts the request); the greenlet waits a bounded moment for that and then re-raises.
- No subprocess can be started in the loop's thread: gevent's subprocess forks, then fails there ("child
  watchers are only available on the default loop"), leaving nothing cached by whoever asked (the openai
  SDK's platform probe: users/stack_openai_async.py runs it once at import, in the main thread).
- Async clients bind to the loop they are created in, so create them inside the bridge's loop:
  `client = bridge.run(httpx.AsyncClient)` works (a `coro_fn` that returns a non-awaitable is simply called
  in the loop's thread), as does `bridge.run(make_client)` for an `async def make_client()`.

Timing: stamp what you measure inside the coroutine, on the loop's thread. A stamp taken in the greenlet
around `run()` also holds the round trip, which is ~15 µs idle but under load is dominated by the loop's own
pass: a new call starts only after the loop has handled the I/O already ready (benchmarks/bench_bridge.py
measured call → start p50 1.5 ms at 50 streams and 8.5 ms at 200, in the loop thread's CPU burst per engine
step). The waiter is woken the moment its awaitable ends (end → resume p50 ≤ 0.1 ms), and first-token
stamps taken in the coroutine match a plain asyncio client's against server truth.

`get_bridge()` gives the process's bridge, started on first use; a child process after `fork` gets a fresh
one (threads do not survive a fork, so the parent's loop thread does not exist there).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar, cast

import gevent
from gevent.event import AsyncResult
from gevent.monkey import get_original

from stopstorm.metrics.plugin.self_monitor import watch_loop

__all__ = ["AsyncBridge", "BridgeClosedError", "get_bridge"]

T = TypeVar("T")

_log = logging.getLogger(__name__)

# The real-thread primitives, whether or not the process is (or will be) monkey-patched.
_start_new_thread: Callable[..., int] = get_original("_thread", "start_new_thread")
_allocate_lock: Callable[[], Any] = get_original("_thread", "allocate_lock")
_get_ident: Callable[[], int] = get_original("_thread", "get_ident")


class BridgeClosedError(RuntimeError):
    """The bridge is closed (or closing): no coroutine can run on it."""


class _InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """An executor that runs each function at once in the calling thread and returns a done Future.

    A ThreadPoolExecutor subclass only because the stock loop's `set_default_executor` insists on one; it
    never starts a thread.
    """

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="stopstorm-inline")

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # as ThreadPoolExecutor's work items do: the awaiting coroutine gets it
            future.set_exception(exc)
        else:
            future.set_result(result)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


def _quiet_abandoned_streams(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Streams a `drop` user abandoned (the openai SDK's stay open until collected) are finalised when the
    garbage collector or the loop's shutdown gets to them, and httpx then complains that their generator is
    "already running". That is the close mode working as designed, not a fault: log it at debug level."""
    if str(context.get("message", "")).startswith("an error occurred during closing of asynchronous generator"):
        _log.debug("abandoned stream finalised late: %s", context.get("exception"))
        return
    loop.default_exception_handler(context)


def _new_event_loop(use_uvloop: bool | None) -> asyncio.AbstractEventLoop:
    """uvloop if wanted and importable, else the stock loop on a real (unpatched) selector."""
    if use_uvloop is not False:
        try:
            import uvloop
        except ImportError:
            if use_uvloop:
                raise
        else:
            return uvloop.new_event_loop()
    # gevent's patch_all replaces selectors.DefaultSelector with a selector that waits in a gevent hub;
    # the loop's thread must block in a real epoll instead.
    selector_cls = get_original("selectors", "DefaultSelector")
    return asyncio.SelectorEventLoop(selector_cls())


class _Call(Generic[T]):
    """One `run()`: created in the caller's thread, started and finished in the loop's thread."""

    __slots__ = ("cancel_requested", "coro_fn", "error", "finished", "result", "task", "value", "watcher")

    def __init__(self, coro_fn: Callable[[], Awaitable[T] | T], watcher: Any) -> None:
        self.coro_fn = coro_fn
        self.watcher = watcher  # the caller hub's async_ watcher; its send() is the only cross-thread call
        self.result: AsyncResult = AsyncResult()
        self.task: asyncio.Future[None] | None = None
        self.cancel_requested = False
        self.finished = False
        self.value: Any = None
        self.error: BaseException | None = None

    # -- in the loop's thread -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.cancel_requested:
            self._finish(None, asyncio.CancelledError())
            return
        try:
            awaitable = self.coro_fn()
            if not inspect.isawaitable(awaitable):
                self._finish(awaitable, None)
                return
            self.task = task = asyncio.ensure_future(self._drive(awaitable))
        except BaseException as exc:
            self._finish(None, exc)
            return
        task.add_done_callback(self._task_done)

    async def _drive(self, awaitable: Awaitable[T]) -> None:
        # The waiter is woken the moment the awaitable ends, not one loop pass later from a done callback,
        # which waits behind every other ready callback (measured: ~1 ms more at 50 busy streams).
        try:
            value = await awaitable
        except BaseException as exc:
            self._finish(None, exc)
            if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                raise  # the task ends cancelled, as asked; the loop sees what it must
        else:
            self._finish(value, None)

    def cancel(self) -> None:
        self.cancel_requested = True
        if self.task is not None:
            self.task.cancel()

    def _task_done(self, task: asyncio.Future[None]) -> None:
        if self.finished:
            return
        # Cancelled before its first step, so `_drive` never ran.
        try:
            task.result()
        except BaseException as exc:
            self._finish(None, exc)
        else:
            self._finish(None, RuntimeError("the bridge's task ended without a result"))

    def _finish(self, value: Any, error: BaseException | None) -> None:
        self.finished = True
        self.value, self.error = value, error
        self.watcher.send()  # thread-safe: wakes the caller's hub, which runs `deliver`

    # -- in the caller's hub ------------------------------------------------------------------------------

    def deliver(self) -> None:
        self.watcher.close()
        self.task = None
        self.coro_fn = None  # type: ignore[assignment]  # drop references promptly (clients, responses)
        if self.error is not None:
            error, self.error = self.error, None
            # With its own traceback, so the coroutine's frames show where it failed.
            self.result.set_exception(error, (type(error), error, error.__traceback__))
        else:
            self.result.set(self.value)
            self.value = None


class AsyncBridge:
    """An asyncio loop in its own real OS thread, driven from greenlets (or plain threads) by `run()`.

    `use_uvloop`: None (default) uses uvloop when importable; False forces the stock loop; True requires
    uvloop. `cancel_wait`: how long an interrupted `run()` waits for the cancelled task to finish (its
    `finally` blocks and stream closes) before re-raising. `start_timeout`: bound on the loop's start-up.
    """

    def __init__(self, use_uvloop: bool | None = None, cancel_wait: float = 2.0, start_timeout: float = 10.0) -> None:
        self.cancel_wait = cancel_wait
        self.pid = os.getpid()
        self._use_uvloop = use_uvloop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_ident: int | None = None
        self._start_error: BaseException | None = None
        self._closing = False
        self._ready = _allocate_lock()
        self._done = _allocate_lock()
        self._ready.acquire()
        self._done.acquire()
        _start_new_thread(self._thread_main, ())
        # A real lock: this blocks the caller's hub for the loop's start-up (about a millisecond), and no
        # greenlet switch can happen meanwhile.
        if not self._ready.acquire(True, start_timeout):
            self._closing = True
            raise RuntimeError(f"the bridge's event loop did not start within {start_timeout} s")
        if self._start_error is not None:
            self._closing = True
            raise RuntimeError("the bridge's event loop failed to start") from self._start_error

    # -- public API -----------------------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The bridge's event loop (running in another thread: schedule on it only thread-safely)."""
        assert self._loop is not None
        return self._loop

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def thread_ident(self) -> int | None:
        """The real thread id of the loop's thread (as `_thread.get_ident()` there returns)."""
        return self._thread_ident

    def run(self, coro_fn: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        """Run `coro_fn()` on the bridge's loop and wait for its result without blocking other greenlets.

        `coro_fn` is called in the loop's thread (so clients it creates bind to that loop); if it returns a
        non-awaitable, that is the result. The coroutine's exception is re-raised here. After `timeout`
        seconds the task is cancelled and `TimeoutError` raised. If the waiting greenlet is interrupted
        (`GreenletExit`, `gevent.Timeout`, KeyboardInterrupt…), the task is cancelled, up to `cancel_wait`
        seconds are given for it to finish, and the interruption propagates.
        """
        if self._closing:
            raise BridgeClosedError("the bridge is closed")
        if self.pid != os.getpid():
            raise BridgeClosedError("this bridge belongs to the parent process; use get_bridge() after a fork")
        if _get_ident() == self._thread_ident:
            raise RuntimeError("AsyncBridge.run() called from the bridge's own loop thread: await instead")
        hub = gevent.get_hub()
        watcher = hub.loop.async_()
        call: _Call[T] = _Call(coro_fn, watcher)
        watcher.start(call.deliver)
        try:
            self.loop.call_soon_threadsafe(call.start)
        except RuntimeError as exc:  # the loop is closed
            watcher.close()
            raise BridgeClosedError("the bridge is closed") from exc
        result = call.result
        try:
            result.wait(timeout)
        except BaseException:
            self._abandon(call)
            raise
        if not result.ready():
            self._abandon(call)
            raise TimeoutError(f"coroutine did not finish within {timeout} s; its task was cancelled")
        error = result.exception
        if isinstance(error, asyncio.CancelledError) and self._closing:
            raise BridgeClosedError("the bridge was closed while the coroutine ran") from error
        return cast(T, result.get(block=False))  # ready, so the value (the stubs allow None for a timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel every task, stop the loop and wait (at most `timeout` s) for its thread to end.

        Blocks the calling thread (and so its hub) for that wait; meant for shutdown. Idempotent.
        """
        if self._closing:
            return
        self._closing = True
        loop = self._loop
        if loop is None or self.pid != os.getpid():
            return
        with contextlib.suppress(RuntimeError):  # already closed
            loop.call_soon_threadsafe(loop.stop)
        if _get_ident() == self._thread_ident:
            return  # called from a coroutine: the thread finishes after this callback returns
        if not self._done.acquire(True, timeout):
            _log.warning("the bridge's event loop thread did not finish within %.1f s", timeout)

    # -- internals ------------------------------------------------------------------------------------------

    def _abandon(self, call: _Call[Any]) -> None:
        """The waiter was interrupted: cancel the task and give it a bounded moment to finish."""
        with contextlib.suppress(RuntimeError):  # loop closed: the task is gone with it
            self.loop.call_soon_threadsafe(call.cancel)
        if self.cancel_wait > 0 and not call.result.ready():
            # A second interruption during this wait propagates instead (the task is cancelled anyway).
            call.result.wait(self.cancel_wait)
        if not call.result.ready():
            # A task ignoring its cancellation must not keep this hub's loop alive for ever.
            call.watcher.ref = False

    def _thread_main(self) -> None:
        try:
            loop = _new_event_loop(self._use_uvloop)
            loop.set_default_executor(_InlineExecutor())
            loop.set_exception_handler(_quiet_abandoned_streams)
            asyncio.set_event_loop(loop)
            self._loop = loop
            self._thread_ident = _get_ident()
        except BaseException as exc:
            self._start_error = exc
            self._ready.release()
            self._done.release()
            return
        self._ready.release()
        try:
            while not self._closing:
                try:
                    loop.run_forever()
                except BaseException:  # e.g. a coroutine raising SystemExit, which the loop re-raises
                    _log.exception("the bridge's event loop stopped with an exception; restarting it")
            self._shutdown(loop)
        finally:
            self._done.release()

    @staticmethod
    def _shutdown(loop: asyncio.AbstractEventLoop, grace: float = 2.0) -> None:
        """Cancel what is left, let it finish (bounded), close the loop. Never `shutdown_default_executor`:
        it starts a (patched, never running) thread."""
        try:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks, timeout=grace))
            loop.run_until_complete(loop.shutdown_asyncgens())
        except BaseException:
            _log.exception("while shutting down the bridge's event loop")
        finally:
            with contextlib.suppress(Exception):
                asyncio.set_event_loop(None)
            loop.close()


# -- the per-process singleton --------------------------------------------------------------------------------

_bridge: AsyncBridge | None = None
_bridge_lock = _allocate_lock()


def get_bridge() -> AsyncBridge:
    """The process's bridge, started on first use (thread-safe); a fresh one in a forked child or after close()."""
    global _bridge
    bridge = _bridge
    if bridge is not None and bridge.pid == os.getpid() and not bridge.closed:
        return bridge
    # A real lock, held without any greenlet switch (AsyncBridge() only blocks on real locks).
    with _bridge_lock:
        bridge = _bridge
        if bridge is None or bridge.pid != os.getpid() or bridge.closed:
            bridge = _bridge = AsyncBridge()
            watch_loop(bridge)  # the self-monitor samples its lag from now on
    return bridge


def _after_fork_in_child() -> None:
    # The parent's loop thread does not exist here, and the lock may have been held by another thread at fork.
    global _bridge_lock
    _bridge_lock = _allocate_lock()


def _close_at_exit() -> None:
    bridge = _bridge
    if bridge is not None and bridge.pid == os.getpid():
        bridge.close(timeout=1.0)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)

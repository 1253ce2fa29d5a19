"""The simulator's HTTP front: OpenAI-compatible routes over the engine, as vLLM's API server does them.

What matters for stops, copied from vLLM (DESIGN.md §5):
- response headers go out at once; the first chunk (role) only once the first token exists;
- every request, streaming or not, runs beside a disconnect listener: uvicorn wakes it on TCP FIN/RST, so a
  closed connection is seen within about a millisecond, and the engine aborts at its next step boundary;
  `--disconnect-delay-ms` makes the server act on it later, and a request that finishes in between runs to its
  end unaborted (`close_missed`), as vLLM's do when its API server acts after the stream's end;
- the engine never waits for the writer: a client that stops reading but keeps its socket open blocks only
  the writer (TCP back-pressure), while its request keeps its slot and runs to the end.
Ledger routes under `/stopstorm/` expose per-request truth; vLLM has no such routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive, Scope, Send

from stopstorm.simulator.config import SimulatorConfig
from stopstorm.simulator.engine import EngineLoop, Scheduler, Sequence, StepPlan
from stopstorm.simulator.faults import Fault, FaultPlan, parse_fault
from stopstorm.simulator.gpu_work import GpuWork
from stopstorm.simulator.ledger import LEDGER_SCHEMA_VERSION, Ledger, LedgerEntry
from stopstorm.simulator.request_log import RequestLog
from stopstorm.simulator.text import TokenText, count_prompt_tokens
from stopstorm.simulator.vllm_metrics import VllmMetrics

__all__ = ["Simulator", "create_app"]

_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_JSON_HEADERS = [(b"content-type", b"application/json")]
_DONE = b"data: [DONE]\n\n"
FAULT_HEADER = "x-stopstorm-fault"


class _ObserverFanOut:
    """Hands each engine event to the metrics and the request log, in that order."""

    def __init__(self, *observers: Any) -> None:
        self._observers = observers

    def on_added(self, seq: Sequence, now: float) -> None:
        for o in self._observers:
            o.on_added(seq, now)

    def on_abort_requested(self, seq: Sequence, now: float) -> None:
        for o in self._observers:
            o.on_abort_requested(seq, now)

    def on_first_token(self, seq: Sequence, now: float) -> None:
        for o in self._observers:
            o.on_first_token(seq, now)

    def on_step(self, plan: StepPlan, now: float, tokens: int, itl_samples: list[float]) -> None:
        for o in self._observers:
            o.on_step(plan, now, tokens, itl_samples)

    def on_finished(self, seq: Sequence, now: float) -> None:
        for o in self._observers:
            o.on_finished(seq, now)

    def on_aborted(self, seq: Sequence, now: float) -> None:
        for o in self._observers:
            o.on_aborted(seq, now)

    def on_queue_change(self, running: int, waiting: int) -> None:
        for o in self._observers:
            o.on_queue_change(running, waiting)


class Simulator:
    """One simulated vLLM server: config, ledger, metrics, request log and the engine loop."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.ledger = Ledger(forget_read=config.forget_read_ledger)
        self.metrics = VllmMetrics(config)
        self.request_log = RequestLog(config.vllm_flavour)
        self.scheduler = Scheduler(config, self.ledger, _ObserverFanOut(self.metrics, self.request_log))
        gpu_work = (GpuWork.create(config.gpu_work_device, config.gpu_work_size, config.gpu_work_fill)
                    if config.gpu_work else None)  # GpuWorkUnavailable says why it cannot run here
        self.engine = EngineLoop(self.scheduler, gpu_work=gpu_work)
        self.fault_plan = FaultPlan(config.faults, config.seed)
        self.metrics.engine_loop = self.engine
        self.created = int(time.time())


class _Output:
    """A request's output as the writer sees it: how many tokens exist, and whether it has finished.

    Like vLLM's RequestOutputCollector, it never blocks the engine: a writer that falls behind finds several
    new tokens at once and sends them merged in one chunk.

    The writer waits on a bare future that the engine resolves, not on an `asyncio.Event`: this wake-up happens
    once per token per stream (50k times a second at full load), and a future skips the Event's waiter deque
    and its set/clear (1.1 -> 0.6 us a wake-up; 0.7 us less simulator CPU per token at 1,024 streams).
    """

    __slots__ = ("_waiter", "finish_reason", "generated")

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None
        self.generated = 0
        self.finish_reason: str | None = None

    def on_tokens(self, generated: int) -> None:
        self.generated = generated
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # done only if the writer was cancelled while waiting
                waiter.set_result(None)

    def on_finish(self, reason: str) -> None:
        self.finish_reason = reason
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def changed(self) -> asyncio.Future[None]:
        """A future resolved by the next `on_tokens` or `on_finish`; check the state before waiting on it."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter


class BadRequest(Exception):
    """A request vLLM would refuse; carries the status and error type vLLM would send."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type


def _error_body(config: SimulatorConfig, message: str, err_type: str, status: int) -> bytes:
    if config.vllm_flavour == "0.9":
        return orjson.dumps({"object": "error", "message": message, "type": err_type, "param": None,
                             "code": status})
    return orjson.dumps({"error": {"message": message, "type": err_type, "param": None, "code": status}})


def _error_response(config: SimulatorConfig, exc: BadRequest) -> Response:
    return Response(_error_body(config, str(exc), exc.err_type, exc.status), status_code=exc.status,
                    media_type="application/json")


async def _wait_for_disconnect(receive: Receive) -> None:
    """Return when the client's connection closes (uvicorn sends http.disconnect on FIN/RST)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _int_param(body: dict[str, Any], name: str, default: int | None, minimum: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise BadRequest(f"{name} must be at least {minimum}, got {value}")
    return value


class _Job:
    """One validated request: its engine sequence and how its response is to be written."""

    def __init__(self, sim: Simulator, body: dict[str, Any], endpoint: str, request_id: str) -> None:
        cfg = sim.config
        self.sim = sim
        self.endpoint = endpoint
        self.request_id = request_id
        if endpoint == "chat":
            if "messages" not in body:
                raise BadRequest("messages: Field required")
            prompt_source = body["messages"]
        else:
            if "prompt" not in body:
                raise BadRequest("prompt: Field required")
            prompt_source = body["prompt"]
        try:
            prompt_tokens = count_prompt_tokens(prompt_source)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        n = _int_param(body, "n", 1, 1)
        if n != 1:
            raise BadRequest("the simulator supports n=1 only")
        max_tokens = _int_param(body, "max_completion_tokens", None, 1)
        if max_tokens is None:
            max_tokens = _int_param(body, "max_tokens", None, 1)
        if max_tokens is None:
            max_tokens = cfg.max_model_len - prompt_tokens
        if prompt_tokens + max_tokens > cfg.max_model_len:
            raise BadRequest(
                f"This model's maximum context length is {cfg.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion."
            )
        if max_tokens < 1:
            raise BadRequest(f"The prompt ({prompt_tokens} tokens) fills the context of {cfg.max_model_len}.")
        min_tokens = _int_param(body, "min_tokens", 0, 0) or 0
        ignore_eos = bool(body.get("ignore_eos", False))
        self.stream = bool(body.get("stream", False))
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise BadRequest("stream_options must be an object")
        if options and not self.stream:
            raise BadRequest("Stream options can only be defined when `stream=True`.")
        self.include_usage = bool(options.get("include_usage", False))
        self.continuous_usage = self.include_usage and bool(options.get("continuous_usage_stats", False))
        self.prompt_tokens = prompt_tokens
        self.model = body["model"]
        self.created = int(time.time())
        self.text = TokenText(request_id)
        self.output = _Output()
        self.entry = LedgerEntry(
            request_id=request_id, endpoint=endpoint, stream=self.stream, prompt_tokens=prompt_tokens,
            max_tokens=max_tokens, target_tokens=max_tokens, arrival=time.monotonic(),
        )
        self._eos = (ignore_eos, min(min_tokens, max_tokens))
        self.fault: Fault | None = None

    def draw_length(self) -> None:
        """Draw the output length, once the request is accepted: a refused request must not consume a draw
        from the seeded generator, or a seed would no longer fix the lengths of the accepted ones."""
        ignore_eos, min_tokens = self._eos
        self.entry.target_tokens = self.sim.scheduler.target_tokens(self.entry.max_tokens, ignore_eos, min_tokens)
        self._content_frame: tuple[bytes, bytes] | None = None

    # -- chunk encoding (bytes joined, no per-token JSON) -----------------------------------------------

    def _usage(self, completion: int) -> bytes:
        p = self.prompt_tokens
        return b'{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}' % (p, p + completion, completion)

    def _head(self) -> bytes:
        obj = b"chat.completion.chunk" if self.endpoint == "chat" else b"text_completion"
        return b'data: {"id":"%s","object":"%s","created":%d,"model":%s,"choices":' % (
            self.request_id.encode(), obj, self.created, orjson.dumps(self.model))

    def _content_parts(self) -> tuple[bytes, bytes]:
        """A content chunk's bytes before and after its text, up to the finish reason; built once per request.

        Every content chunk of a request shares its head (id, created, model) and the choice's frame, so only
        the text and the tail vary: one join instead of re-formatting the head saves 0.6 us of simulator CPU a
        token at 1,024 streams (~7 %).
        """
        if self.endpoint == "chat":
            before = self._head() + b'[{"index":0,"delta":{"content":"'
            after = b'"},"logprobs":null,"finish_reason":'
        else:
            before = self._head() + b'[{"index":0,"text":"'
            after = b'","logprobs":null,"finish_reason":'
        self._content_frame = before, after
        return before, after

    def role_chunk(self) -> bytes:
        usage = b',"usage":' + self._usage(0) if self.continuous_usage else b""
        return (self._head() + b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                b'"finish_reason":null}]' + usage + b"}\n\n")

    def content_chunk(self, first: int, stop: int, finish: str | None) -> bytes:
        before, after = self._content_frame or self._content_parts()
        text = self.text.escaped(first, stop)
        if finish is None and not self.continuous_usage:  # the common chunk: one join, no formatting
            return b"".join((before, text, after, b'null,"stop_reason":null}]}\n\n'))
        reason = b'"%s"' % finish.encode() if finish else b"null"
        usage = b',"usage":' + self._usage(stop) if self.continuous_usage else b""
        return b"".join((before, text, after, reason, b',"stop_reason":null}]', usage, b"}\n\n"))

    def usage_chunk(self, completion: int) -> bytes:
        return self._head() + b'[],"usage":' + self._usage(completion) + b"}\n\n"

    def error_chunk(self, message: str, err_type: str, status: int) -> bytes:
        return b"data: " + _error_body(self.sim.config, message, err_type, status) + b"\n\n"

    def full_response(self) -> bytes:
        e = self.entry
        text = self.text.text(0, e.generated_tokens)
        usage = orjson.loads(self._usage(e.generated_tokens))
        if self.endpoint == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": e.finish_reason, "stop_reason": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": e.finish_reason,
                      "stop_reason": None}
            obj = "text_completion"
        return orjson.dumps({"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
                             "choices": [choice], "usage": usage})

    # -- ASGI response ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request beside a disconnect listener, as vLLM's routes do; a close aborts it. Its ledger
        entry settles once the response is done and the engine has let it go (simulator/ledger.py)."""
        seq = Sequence(self.entry, sink=self.output)
        self.sim.engine.add(seq)
        try:
            await self._respond(seq, receive, send)
        finally:
            self.sim.ledger.responded(self.entry)

    async def _respond(self, seq: Sequence, receive: Receive, send: Send) -> None:
        slow = self.fault is not None and self.fault.kind == "slow-headers"
        if self.stream and not slow:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        work = asyncio.ensure_future(self._stream(send, slow) if self.stream else self._unary(send))
        listener = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait((work, listener), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not listener.done():
                listener.cancel()
        if work in done:
            work.result()
            return
        self.entry.connection_lost = time.monotonic()
        delay = self.sim.config.disconnect_delay_s
        if delay > 0:
            # The server acts on the close only after `delay`; the stream goes on meanwhile (uvicorn drops its
            # writes to the closed connection), and if the request finishes first nothing is aborted.
            # (in a loop: an event loop's timer may fire a fraction of a millisecond early, and acting before
            # `delay` would let a request that ends in that sliver be aborted)
            deadline = self.entry.connection_lost + delay
            while not work.done() and (left := deadline - time.monotonic()) > 0:
                await asyncio.wait((work,), timeout=left)
            if work.done():
                self.entry.close_missed = True
                with contextlib.suppress(OSError):
                    work.result()
                return
        # The client closed its connection before we were done: abort, as vLLM does.
        self.sim.engine.client_gone(self.entry)
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await work

    async def _stream(self, send: Send, slow_headers: bool = False) -> None:
        """Write the SSE stream: at each wake-up, one chunk with every token generated since the last one."""
        out, entry, fault = self.output, self.entry, self.fault
        if slow_headers:
            assert fault is not None and fault.seconds is not None
            await asyncio.sleep(fault.seconds)
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        if fault is not None and fault.kind == "empty":
            self._server_failed("simulated empty stream: no event sent")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        per_chunk = self.sim.config.tokens_per_chunk
        send_times = entry.send_times = [] if self.sim.config.ledger_send_times else None
        sent = 0
        while True:
            generated, finish = out.generated, out.finish_reason
            if finish is None and generated - sent < per_chunk:
                await out.changed()
                continue
            if fault is not None and fault.after is not None and generated >= fault.after:
                if fault.kind == "error-after":
                    await self._fail_mid_stream(send)
                    return
                if fault.kind == "reset-after":
                    # Returning with the response unfinished makes uvicorn close the connection: no last chunk.
                    self._server_failed(f"simulated connection reset after {sent} tokens sent")
                    return
                if fault.kind == "stall-after":
                    assert fault.seconds is not None
                    await asyncio.sleep(fault.seconds)  # the engine goes on; the tokens go out merged after
                    fault = None
                    continue
                odd = self._odd_event(fault)
                fault = None  # once per request
                await send({"type": "http.response.body", "body": odd, "more_body": True})
                continue
            parts: list[bytes] = []
            if sent == 0 and generated and self.endpoint == "chat":
                parts.append(self.role_chunk())
            if generated > sent:
                parts.append(self.content_chunk(sent, generated, finish))
            if finish is not None:
                if finish == "abort":
                    return  # only a gone client gets here; nothing more to send
                if generated == sent:
                    parts.append(self.content_chunk(sent, sent, finish))
                if self.include_usage:
                    parts.append(self.usage_chunk(generated))
                parts.append(_DONE)
            # Read the clock before the write: once the bytes are on the socket the client may read them before
            # this task runs again, and a send time must never come after the client's read of it.
            now = time.monotonic()
            await send({"type": "http.response.body", "body": b"".join(parts), "more_body": finish is None})
            if generated > sent:
                if sent == 0:
                    entry.first_sent = now
                if send_times is not None:
                    send_times.append([now, generated])
            sent = entry.sent_tokens = generated
            if finish is not None:
                return

    def _server_failed(self, error: str) -> None:
        """The server itself ends this request (an injected fault): say why in the ledger, free its slot."""
        self.entry.error = error
        self.sim.scheduler.request_abort(self.request_id, time.monotonic())

    def _odd_event(self, fault: Fault) -> bytes:
        """The bytes a `malformed:SHAPE` fault puts in the stream."""
        shape = fault.shape
        if shape == "not-json":
            return b"data: {this is not json\n\n"
        if shape == "missing-fields":
            return b'data: {"object":"chat.completion.chunk"}\n\n'
        # The valid-but-unusual shapes wrap the next real chunk (the role chunk, same for every request).
        chunk = self.role_chunk() if self.endpoint == "chat" else self.content_chunk(0, 0, None)
        if shape == "crlf":
            return chunk[:-2].replace(b"\n", b"\r\n") + b"\r\n\r\n"
        if shape == "no-space":
            return b"data:" + chunk[len(b"data: "):]
        return b": stopstorm comment\n\n:\n\n" + chunk  # comments (and keep-alive blank events)

    async def _fail_mid_stream(self, send: Send) -> None:
        """An engine error after some tokens: vLLM sends `data: {"error": …}` then `[DONE]`."""
        self.entry.status_code = 500
        self._server_failed(f"simulated engine error after {self.entry.generated_tokens} tokens")
        body = self.error_chunk("Simulated engine error (x-stopstorm-fault)", "InternalServerError", 500) + _DONE
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _unary(self, send: Send) -> None:
        out = self.output
        while out.finish_reason is None:
            await out.changed()
        self.entry.sent_tokens = self.entry.generated_tokens
        body = self.full_response()
        await send({"type": "http.response.start", "status": 200, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class _AsgiJob(Response):
    """Lets a route return a `_Job` as its response object."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.job(scope, receive, send)


def _fault_for(sim: Simulator, header: str | None) -> Fault | None:
    """The request's fault: its header's (a bad one is a 400), else a draw from `--fault`."""
    if not header:
        return sim.fault_plan.draw()
    try:
        return parse_fault(header)
    except ValueError as exc:
        raise BadRequest(f"{FAULT_HEADER}: {exc}") from None


_STATUS_TYPES = {400: "BadRequestError", 429: "RateLimitError", 500: "InternalServerError",
                 503: "ServiceUnavailableError"}


def _refuse(sim: Simulator, job: _Job, code: int) -> Response:
    """An injected `status:CODE`: the request is in the ledger (freed at once, never run) and refused."""
    entry = job.entry
    entry.status_code = code
    entry.error = f"simulated HTTP {code}"
    entry.freed = entry.arrival
    sim.ledger.add(entry)
    sim.ledger.responded(entry)
    return _error_response(sim.config, BadRequest(f"Simulated error {code} ({FAULT_HEADER})", code,
                                                  _STATUS_TYPES[code]))


def create_app(config: SimulatorConfig) -> FastAPI:
    """The ASGI app for one simulator; `app.state.sim` holds its ledger, metrics and engine."""
    sim = Simulator(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sim.engine.start()
        yield
        await sim.engine.stop()

    app = FastAPI(title="stopstorm simulator", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.sim = sim

    async def _completion(request: Request, endpoint: str) -> Response:
        try:
            try:
                body = orjson.loads(await request.body())
            except orjson.JSONDecodeError as exc:
                raise BadRequest(f"Request body is not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise BadRequest("Request body must be a JSON object")
            model = body.get("model")
            if model is not None and model != config.model:
                raise BadRequest(f"The model `{model}` does not exist.", 404, "NotFoundError")
            body["model"] = config.model
            prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
            request_id = prefix + (request.headers.get("x-request-id") or uuid.uuid4().hex)
            if sim.ledger.get(request_id) is not None:
                raise BadRequest(f"request id {request_id} is already in use")
            header = request.headers.get(FAULT_HEADER)
            fault = _fault_for(sim, header)
            job = _Job(sim, body, endpoint, request_id)
            if fault is not None and not job.stream and fault.kind != "status":
                if header:
                    raise BadRequest(f"{FAULT_HEADER}: fault {fault.spec!r} needs stream=true")
                fault = None  # a drawn stream fault does not apply to a unary request
            if fault is not None:
                job.fault = fault
                job.entry.fault = fault.spec
        except BadRequest as exc:
            return _error_response(config, exc)
        if fault is not None and fault.code is not None:
            return _refuse(sim, job, fault.code)
        if config.max_waiting is not None and len(sim.scheduler.waiting) >= config.max_waiting:
            return _error_response(config, BadRequest(
                f"The server is overloaded: {len(sim.scheduler.waiting)} requests are already waiting "
                f"(--max-waiting {config.max_waiting}).", 503, "ServiceUnavailableError"))
        job.draw_length()
        return _AsgiJob(job)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _completion(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _completion(request, "completions")

    @app.get("/v1/models")
    async def models() -> Response:
        card = {"id": config.model, "object": "model", "created": sim.created, "owned_by": "vllm",
                "root": config.model, "parent": None, "max_model_len": config.max_model_len}
        return Response(orjson.dumps({"object": "list", "data": [card]}), media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> Response:
        return Response(orjson.dumps({"version": f"stopstorm-simulator (mimics vLLM {config.vllm_flavour})"}),
                        media_type="application/json")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(sim.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stopstorm/ledger")
    async def ledger() -> Response:
        return Response(orjson.dumps(sim.ledger.to_json()), media_type="application/json")

    @app.get("/stopstorm/ledger/settled")
    async def ledger_settled(after: int = 0, limit: int = 5000, in_flight: bool = False) -> Response:
        """Entries in the order they settled, after number `after` (which acknowledges 1..after: under
        --forget-read-ledger those are dropped), at most `limit`; `next` is the number to ask after next time.
        With `in_flight`, the entries not settled yet too."""
        led = sim.ledger
        entries, last = led.settled_after(after, max(1, min(limit, 100_000)))
        doc: dict[str, Any] = {
            "schema_version": LEDGER_SCHEMA_VERSION, "clock": "monotonic", "epoch_offset": led.epoch_offset,
            "now": time.monotonic(), "next": last, "settled": led.settled_count, "forgotten": led.forgotten,
            "forget_read": led.forget_read, "unsettled": led.unsettled_count,
            "requests": [e.to_json() for e in entries]}
        if in_flight:
            doc["in_flight"] = [e.to_json() for e in led.in_flight()]
        return Response(orjson.dumps(doc), media_type="application/json")

    @app.get("/stopstorm/ledger/{request_id}")
    async def ledger_entry(request_id: str) -> Response:
        entry = sim.ledger.get(request_id)
        if entry is None:
            return _error_response(config, BadRequest(f"no request {request_id} in the ledger", 404,
                                                      "NotFoundError"))
        return Response(orjson.dumps(entry.to_json()), media_type="application/json")

    @app.post("/stopstorm/ledger/reset")
    async def ledger_reset() -> Response:
        removed = sim.ledger.reset()
        return Response(orjson.dumps({"removed": removed, "in_flight": len(sim.ledger)}),
                        media_type="application/json")

    @app.get("/stopstorm/stats")
    async def stats() -> Response:
        return Response(orjson.dumps({"engine": sim.engine.stats(), "config": {
            "model": config.model, "max_num_seqs": config.max_num_seqs,
            "max_num_batched_tokens": config.max_num_batched_tokens, "max_model_len": config.max_model_len,
            "step_base_s": config.step_base_s, "step_per_seq_s": config.step_per_seq_s,
            "prefill_per_token_s": config.prefill_per_token_s, "output_len": str(config.output_len),
            "tokens_per_chunk": config.tokens_per_chunk, "vllm_flavour": config.vllm_flavour,
            "disconnect_delay_s": config.disconnect_delay_s}}),
            media_type="application/json")

    return app

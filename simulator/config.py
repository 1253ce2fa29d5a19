"""The simulator's settings, in one place, with the command line that fills them.

Defaults follow the seed experiment (`--max-num-seqs 2`) and vLLM's own flag names wherever vLLM has the
same knob, so a user can read a simulator command as if it were a `vllm serve` command.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from stopstorm.distributions import LengthDistribution
from stopstorm.simulator.faults import FAULT_KINDS, Fault, parse_fault

__all__ = ["VLLM_FLAVOURS", "SimulatorConfig", "build_parser", "config_from_args"]

VLLM_FLAVOURS = ("latest", "0.9")


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Everything the engine and the HTTP front need to behave like one vLLM server."""

    model: str = "llm"
    max_num_seqs: int = 2
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    max_waiting: int | None = None
    # Step-time model: one engine step costs base + per running sequence + per prefill token.
    step_base_s: float = 0.015
    step_per_seq_s: float = 0.00005
    prefill_per_token_s: float = 0.00002
    # Output length when EOS is allowed (ignore_eos false); capped by max_tokens.
    output_len: LengthDistribution = dataclasses.field(
        default_factory=lambda: LengthDistribution.parse("exponential:256")
    )
    tokens_per_chunk: int = 1
    seed: int = 0
    vllm_flavour: str = "latest"
    # A step that ends later than the model says by more than this is counted as behind schedule.
    lag_tolerance_s: float = 0.002
    # Faults drawn per request (--fault); a request's x-stopstorm-fault header overrides the draw.
    faults: tuple[Fault, ...] = ()
    # Keep every chunk's send time in the ledger (benchmarks of client timing; memory grows per chunk).
    ledger_send_times: bool = False
    # Drop ledger entries a reader has acknowledged (GET /stopstorm/ledger/settled?after=N), so a long run keeps
    # only what is in flight or unread; the embedded simulator runs so, its one reader being stopstorm.
    forget_read_ledger: bool = False
    # How long after the HTTP front sees a client's close the server acts on it (asks the engine to abort).
    # vLLM acts within milliseconds when its API server keeps up, and a stream whose request finishes before
    # the server acts runs to its end unaborted (docs/guides/missed-closes.md); 0 acts at once.
    disconnect_delay_s: float = 0.0
    # GPU mode (simulator/gpu_work.py): real CUDA work each step, sized to the batch.
    gpu_work: bool = False
    gpu_work_device: int = 0
    gpu_work_size: int = 4096
    gpu_work_fill: float = 0.9

    def step_duration(self, running: int, prefill_tokens: int) -> float:
        """Seconds one engine step takes with `running` sequences and `prefill_tokens` prompt tokens."""
        return self.step_base_s + self.step_per_seq_s * running + self.prefill_per_token_s * prefill_tokens


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
    return value


def _length(text: str) -> LengthDistribution:
    try:
        return LengthDistribution.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _fault(text: str) -> Fault:
    try:
        return parse_fault(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    """The `python -m stopstorm.simulator` command line; flag names follow `vllm serve` where vLLM has the knob."""
    d = SimulatorConfig()
    p = argparse.ArgumentParser(
        prog="python -m stopstorm.simulator",
        description="An OpenAI-compatible streaming server faithful to vLLM's scheduling, "
        "client-disconnect aborts and /metrics, with a per-request ledger of server truth.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8009, help="port to bind; 0 picks a free one (default 8009)")
    p.add_argument("--served-model-name", dest="model", default=d.model, help="model name served (default llm)")
    p.add_argument("--max-num-seqs", type=_positive_int, default=d.max_num_seqs,
                   help="running slots, as vLLM's --max-num-seqs (default 2, as in the seed)")
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=d.max_num_batched_tokens,
                   help="token budget per engine step shared by decodes and chunked prefill (default 2048)")
    p.add_argument("--max-model-len", type=_positive_int, default=d.max_model_len,
                   help="context length; prompt + max_tokens beyond it is a 400 (default 4096)")
    p.add_argument("--max-waiting", type=_positive_int, default=None,
                   help="cap on the waiting queue; a request beyond it gets 503 (default: no cap)")
    p.add_argument("--step-base-ms", type=_non_negative_float, default=d.step_base_s * 1e3,
                   help="fixed cost of one engine step in ms (default 15)")
    p.add_argument("--step-per-seq-ms", type=_non_negative_float, default=d.step_per_seq_s * 1e3,
                   help="added step cost per running sequence in ms (default 0.05)")
    p.add_argument("--prefill-per-token-ms", type=_non_negative_float, default=d.prefill_per_token_s * 1e3,
                   help="added step cost per prompt token prefilled in ms (default 0.02)")
    p.add_argument("--output-len", type=_length, default=d.output_len,
                   help="output length when EOS is allowed: fixed:N, uniform:A:B or exponential:MEAN "
                   "(default exponential:256); max_tokens caps it, ignore_eos skips it")
    p.add_argument("--tokens-per-chunk", type=_positive_int, default=d.tokens_per_chunk,
                   help="tokens merged into one SSE chunk (default 1; a slow reader gets merged chunks anyway)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for output lengths and text (default 0)")
    p.add_argument("--vllm-flavour", choices=VLLM_FLAVOURS, default=d.vllm_flavour,
                   help="which vLLM to mimic in /metrics names and log lines: latest or 0.9 (default latest)")
    p.add_argument("--lag-tolerance-ms", type=_non_negative_float, default=d.lag_tolerance_s * 1e3,
                   help="a step ending later than its model time by more than this counts as behind (default 2)")
    p.add_argument("--fault", dest="faults", type=_fault, action="append", default=[],
                   help=f"inject a fault into a share of requests: KIND[:ARG][@RATE], repeatable, rates adding up to "
                   f"at most 1; KIND is {', '.join(FAULT_KINDS)} (see simulator/faults.py); e.g. status:503@0.1")
    p.add_argument("--ledger-send-times", action="store_true",
                   help="keep every chunk's send time in the ledger ([time, sent_tokens] pairs; for benchmarks)")
    p.add_argument("--forget-read-ledger", action="store_true",
                   help="drop ledger entries once a reader has drained them (GET /stopstorm/ledger/settled?after=N "
                   "acknowledges 1..N), so memory stays flat over a long run; stopstorm's embedded simulator runs so")
    p.add_argument("--disconnect-delay-ms", type=_non_negative_float, default=d.disconnect_delay_s * 1e3,
                   help="act on a client's close this long after the HTTP front sees it (default 0: at once); a "
                   "request that finishes in between runs to its end unaborted and is marked close_missed in the "
                   "ledger, as vLLM's are when its API server acts late (docs/guides/missed-closes.md)")
    p.add_argument("--gpu-work", action="store_true", default=False,
                   help="GPU mode: each engine step runs real CUDA work sized to its batch, so NVML sees load "
                   "come and go with the slots (needs torch with CUDA)")
    p.add_argument("--gpu-work-device", type=int, default=d.gpu_work_device,
                   help="CUDA device for --gpu-work (default 0)")
    p.add_argument("--gpu-work-size", type=_positive_int, default=d.gpu_work_size,
                   help="side of the square fp16 matrices --gpu-work multiplies (default 4096)")
    p.add_argument("--gpu-work-fill", type=_fraction, default=d.gpu_work_fill,
                   help="share of a full batch's step the GPU is kept busy, 0-1 (default 0.9)")
    p.add_argument("--log-file", default=None, help="also write the vLLM-like request log to this file")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="exit when this process is gone (used when embedded by the locustfile)")
    return p


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Turn parsed flags into a config (ms on the command line, seconds inside)."""
    return SimulatorConfig(
        model=args.model,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        max_waiting=args.max_waiting,
        step_base_s=args.step_base_ms / 1e3,
        step_per_seq_s=args.step_per_seq_ms / 1e3,
        prefill_per_token_s=args.prefill_per_token_ms / 1e3,
        output_len=args.output_len,
        tokens_per_chunk=args.tokens_per_chunk,
        ledger_send_times=args.ledger_send_times,
        forget_read_ledger=getattr(args, "forget_read_ledger", False),
        disconnect_delay_s=getattr(args, "disconnect_delay_ms", 0.0) / 1e3,
        seed=args.seed,
        vllm_flavour=args.vllm_flavour,
        lag_tolerance_s=args.lag_tolerance_ms / 1e3,
        faults=tuple(getattr(args, "faults", ())),
        gpu_work=args.gpu_work,
        gpu_work_device=args.gpu_work_device,
        gpu_work_size=args.gpu_work_size,
        gpu_work_fill=args.gpu_work_fill,
    )

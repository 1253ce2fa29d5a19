"""Simulator GPU mode: the sizing and the engine's hook run everywhere; the real CUDA work only where torch with
CUDA is importable (skipped here otherwise, with the reason)."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from stopstorm.simulator.config import SimulatorConfig, build_parser, config_from_args
from stopstorm.simulator.engine import EngineLoop, Scheduler, Sequence
from stopstorm.simulator.gpu_work import GpuWork, GpuWorkUnavailable, ops_for_step
from stopstorm.simulator.ledger import Ledger, LedgerEntry


def _cuda_reason() -> str | None:
    """None when torch with CUDA is usable here, else why not."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (GPU mode needs torch with CUDA)"
    import torch

    return None if torch.cuda.is_available() else f"torch {torch.__version__} sees no CUDA device"


CUDA_REASON = _cuda_reason()


def test_sizing_follows_the_batch():
    op = 0.0005  # a 0.5 ms product
    full = ops_for_step(0.015, 2, 2, op, 0.9)
    assert full == 27  # 0.9 × 15 ms / 0.5 ms
    assert ops_for_step(0.015, 1, 2, op, 0.9) == 13  # half the slots, half the work
    assert ops_for_step(0.015, 0, 2, op, 0.9) == 0  # nothing running: the GPU idles
    assert ops_for_step(0.015, 5, 2, op, 0.9) == full  # never more than a full batch
    assert ops_for_step(0.0001, 1, 256, op, 0.9) == 1  # a running batch always launches something
    assert ops_for_step(0.015, 2, 2, op, 1.0) * op <= 0.015


def test_options_parse_and_refuse_bad_values(capsys):
    cfg = config_from_args(build_parser().parse_args(["--gpu-work", "--gpu-work-fill", "0.5", "--gpu-work-size",
                                                      "2048", "--gpu-work-device", "1"]))
    assert (cfg.gpu_work, cfg.gpu_work_fill, cfg.gpu_work_size, cfg.gpu_work_device) == (True, 0.5, 2048, 1)
    assert SimulatorConfig().gpu_work is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--gpu-work-fill", "0"])
    assert "--gpu-work-fill: must be above 0 and at most 1" in capsys.readouterr().err


class LaunchRecorder:
    """A stand-in for GpuWork that records what the engine asks of it (no GPU here)."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, int, int]] = []

    def launch(self, step_s: float, running: int, max_num_seqs: int) -> int:
        self.calls.append((step_s, running, max_num_seqs))
        return running


def test_engine_launches_work_per_step_sized_to_the_running_batch():
    cfg = SimulatorConfig(step_base_s=0.002, step_per_seq_s=0.0, prefill_per_token_s=0.0, max_num_seqs=2)
    recorder = LaunchRecorder()
    ledger = Ledger()

    class Quiet:
        def __getattr__(self, _name):
            return lambda *a, **k: None

    loop = EngineLoop(Scheduler(cfg, ledger, Quiet()), gpu_work=recorder)  # type: ignore[arg-type]

    async def go() -> None:
        loop.start()
        for i, target in enumerate((3, 6)):
            entry = LedgerEntry(request_id=f"r{i}", endpoint="chat", stream=True, prompt_tokens=4,
                                max_tokens=target, target_tokens=target, arrival=time.monotonic())
            ledger.add(entry)
            loop.add(Sequence(entry))
        deadline = time.monotonic() + 5
        while not loop.scheduler.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        n = len(recorder.calls)
        await asyncio.sleep(0.03)  # idle engine: no more launches
        assert len(recorder.calls) == n
        await loop.stop()

    asyncio.run(go())
    running = [r for _, r, _ in recorder.calls]
    assert running[0] == 2 and running[-1] == 1 and set(running) == {1, 2}
    assert all(s == pytest.approx(0.002) and m == 2 for s, _, m in recorder.calls)
    assert len(recorder.calls) == loop.steps


@pytest.mark.skipif(CUDA_REASON is None, reason="torch with CUDA is usable here: the refusal cannot be seen")
def test_without_cuda_the_simulator_refuses_gpu_mode_naming_the_option():
    with pytest.raises(GpuWorkUnavailable):
        GpuWork.create()
    out = subprocess.run([sys.executable, "-m", "stopstorm.simulator", "--port", "0", "--gpu-work"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "simulator: --gpu-work needs torch with CUDA:" in out.stderr


@pytest.mark.skipif(CUDA_REASON is not None, reason=f"needs torch with CUDA: {CUDA_REASON}")
def test_real_cuda_work_scales_with_the_batch_and_nvml_sees_it():
    work = GpuWork.create(size=2048, fill=0.9)
    assert work.op_s > 0
    full = work.launch(0.02, 2, 2)
    half = work.launch(0.02, 1, 2)
    assert half == pytest.approx(full / 2, abs=1)
    pynvml = pytest.importorskip("pynvml")
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            work.launch(0.02, 2, 2)
            time.sleep(0.02)
        busy = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        work.launch(0.02, 0, 2)  # waits for the last step, launches nothing
        time.sleep(1.5)
        idle = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
    finally:
        pynvml.nvmlShutdown()
    assert busy >= 50 and idle <= 10, (busy, idle)

"""Simulator GPU mode (`--gpu-work`): each engine step does real GPU work sized to its batch, so NVML sees load
appear with the slots and vanish when a Stop frees them. This is how the GPU hook is validated end to end.

Sizing: the GPU is kept busy for `fill` × (running ÷ max_num_seqs) of each modelled step, in fixed-size fp16
matrix products whose cost is measured once at start (`calibrate`). A full batch keeps it ~`fill` busy, half a
batch half as long, an empty engine not at all (no step, no kernel). The work is launched asynchronously at the
step's start and runs while the step's modelled time passes; before the next launch the previous step's work
is waited for, so a GPU slower than the model shows as step lag (counted, as ever), never as hidden queueing.

Needs torch with CUDA; without it `GpuWork.create` raises `GpuWorkUnavailable` with the reason, and the
simulator exits naming `--gpu-work`. torch is not a dependency of stopstorm: install it where the GPU is.
"""

from __future__ import annotations

import math
import time
from typing import Any

__all__ = ["GpuWork", "GpuWorkUnavailable", "ops_for_step"]


class GpuWorkUnavailable(RuntimeError):
    """--gpu-work cannot run here; the message says why."""


def ops_for_step(step_s: float, running: int, max_num_seqs: int, op_s: float, fill: float) -> int:
    """How many calibrated products keep the GPU busy for fill × running/max_num_seqs of a `step_s` step."""
    if running <= 0 or step_s <= 0 or op_s <= 0 or fill <= 0:
        return 0
    share = min(1.0, running / max_num_seqs)
    return max(1, math.floor(fill * share * step_s / op_s))


class GpuWork:
    """Square fp16 products on one CUDA device, launched per step; `launch` never blocks longer than the GPU's
    backlog from the previous step."""

    def __init__(self, torch: Any, device: int, size: int, fill: float) -> None:
        self.torch = torch
        self.device = torch.device(f"cuda:{device}")
        self.size = size
        self.fill = fill
        self.a = torch.randn(size, size, device=self.device, dtype=torch.float16)
        self.b = torch.randn(size, size, device=self.device, dtype=torch.float16)
        self.out = torch.empty(size, size, device=self.device, dtype=torch.float16)
        self.op_s = self.calibrate()
        self._done: Any = None
        self.steps = 0
        self.ops = 0
        self.wait_s = 0.0  # time launch() spent waiting for the previous step's work

    @classmethod
    def create(cls, device: int = 0, size: int = 4096, fill: float = 0.9) -> GpuWork:
        try:
            import torch
        except ImportError as exc:
            raise GpuWorkUnavailable(f"torch is not importable ({exc})") from None
        if not torch.cuda.is_available():
            raise GpuWorkUnavailable(f"torch {torch.__version__} sees no CUDA device "
                                     f"(built for CUDA {torch.version.cuda})")
        if not 0 <= device < torch.cuda.device_count():
            raise GpuWorkUnavailable(f"CUDA device {device} not present ({torch.cuda.device_count()} visible)")
        return cls(torch, device, size, fill)

    def calibrate(self, repeats: int = 20) -> float:
        """Seconds one product takes on this GPU, after a warm-up."""
        torch = self.torch
        for _ in range(3):
            torch.mm(self.a, self.b, out=self.out)
        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(self.a, self.b, out=self.out)
        torch.cuda.synchronize(self.device)
        return (time.perf_counter() - start) / repeats

    def launch(self, step_s: float, running: int, max_num_seqs: int) -> int:
        """Queue this step's products (after the last step's have finished); returns how many."""
        n = ops_for_step(step_s, running, max_num_seqs, self.op_s, self.fill)
        if self._done is not None:
            began = time.perf_counter()
            self._done.synchronize()
            self.wait_s += time.perf_counter() - began
            self._done = None
        if n == 0:
            return 0
        torch = self.torch
        with torch.cuda.device(self.device):
            for _ in range(n):
                torch.mm(self.a, self.b, out=self.out)
            self._done = torch.cuda.Event()
            self._done.record()
        self.steps += 1
        self.ops += n
        return n

    def stats(self) -> dict[str, float | int]:
        return {"op_s": self.op_s, "size": self.size, "fill": self.fill, "steps": self.steps, "ops": self.ops,
                "wait_s": self.wait_s}

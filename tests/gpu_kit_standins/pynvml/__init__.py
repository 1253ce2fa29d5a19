"""A stand-in for pynvml over the torch stand-in's virtual GPU (see README.txt): one GPU, busy while work is
queued on it. Only the calls metrics/gpu_sampler.py and scripts/gpu_kit.py make."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace
from typing import Any

NVML_CLOCK_SM = 1
NVML_GPU_UTILIZATION_SAMPLES = 1
IDLE_W, BUSY_W = 60.0, 300.0
_T0 = time.time()


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_NotFound(NVMLError):
    pass


def _gpu() -> dict[str, float]:
    try:
        with open(os.environ["STANDIN_GPU_STATE"]) as fh:
            doc: dict[str, float] = json.load(fh)
            return doc
    except (KeyError, OSError, ValueError):
        return {"busy_until": 0.0, "busy_s": 0.0}


def _busy() -> bool:
    return time.time() < _gpu()["busy_until"]


def nvmlInit() -> None:
    pass


def nvmlShutdown() -> None:
    pass


def nvmlSystemGetDriverVersion() -> str:
    return "standin"


def nvmlDeviceGetCount() -> int:
    return 1


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    return index


def nvmlDeviceGetName(_h: Any) -> str:
    return "Stand-in GPU (CPU rehearsal)"


def nvmlDeviceGetUUID(_h: Any) -> str:
    return "GPU-standin-rehearsal"


def nvmlDeviceGetUtilizationRates(_h: Any) -> Any:
    return SimpleNamespace(gpu=100 if _busy() else 0, memory=0)


def nvmlDeviceGetPowerUsage(_h: Any) -> int:
    return int((BUSY_W if _busy() else IDLE_W) * 1e3)


def nvmlDeviceGetTotalEnergyConsumption(_h: Any) -> int:
    busy_s = _gpu()["busy_s"]
    return int((IDLE_W * (time.time() - _T0) + (BUSY_W - IDLE_W) * busy_s) * 1e3)


def nvmlDeviceGetMemoryInfo(_h: Any, version: Any = None) -> Any:
    return SimpleNamespace(used=1 << 30, total=1 << 34, free=(1 << 34) - (1 << 30))


def nvmlDeviceGetClockInfo(_h: Any, _type: int) -> int:
    return 1410


def nvmlDeviceGetSamples(_h: Any, _type: int, _ts: int) -> Any:
    raise NVMLError_NotSupported("the stand-in has no driver samples")

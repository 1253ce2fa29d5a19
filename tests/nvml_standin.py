"""A stand-in for the `pynvml` module (nvidia-ml-py), for tests on machines without an NVIDIA GPU.

It is not NVML. Only the device calls stopstorm makes are scripted here, over GPUs whose utilisation and power
are functions of time (energy is the integral of that power, so a test can check figures against it). The rest
is pynvml's own: its constants, its NVMLError classes (pynvml maps an error code to its subclass without the
library), and the ctypes structures its calls return. `tests/test_gpu.py` checks that every call here has the
signature of pynvml's, and that every `nvml.` name the sampler uses is here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pynvml
from pynvml import (
    NVML_CLOCK_SM,
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_GPU_UTILIZATION_SAMPLES,
    NVML_VALUE_TYPE_UNSIGNED_INT,
    NVMLError,
)

# pynvml names the stand-in hands on unchanged (the module-level names the sampler reads besides the calls).
PASSED_THROUGH = ("NVML_CLOCK_SM", "NVML_GPU_UTILIZATION_SAMPLES", "NVMLError", "NVMLError_NotSupported",
                  "NVMLError_NotFound", "NVMLError_LibraryNotFound", "NVMLError_Unknown")


@dataclass
class StandinGpu:
    """A scripted GPU: utilisation (%) and power (W) as functions of wall-clock time."""

    name: str = "Stand-in GPU"
    uuid: str = "GPU-standin-0"
    util: Callable[[float], float] = lambda t: 0.0
    power_w: Callable[[float], float] = lambda t: 50.0
    mem_used: int = 1 << 30
    sm_clock: int = 1410
    unsupported: set[str] = field(default_factory=set)  # call names that raise NotSupported
    energy_mj: float = 1_000_000.0  # counter since "driver load"
    _last_t: float | None = None
    driver_samples: list[tuple[int, float]] = field(default_factory=list)  # (µs wall, util)


class StandinNvml:
    """The module-like object passed as `nvml=`; `wall` is the clock its GPUs run on (time.time by default)."""

    def __init__(self, gpus: list[StandinGpu] | None = None, wall: Callable[[], float] | None = None,
                 fail_init: bool = False, driver_rate_s: float = 1 / 60) -> None:
        import time

        self.gpus = gpus if gpus is not None else [StandinGpu()]
        self.wall = wall or time.time
        self.fail_init = fail_init
        self.driver_rate_s = driver_rate_s
        self.inits = 0
        self.shutdowns = 0
        self._driver_t: dict[int, float] = {}
        for name in PASSED_THROUGH:
            setattr(self, name, getattr(pynvml, name))

    # -- the pynvml surface -------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
        self.inits += 1
        now = self.wall()
        for i, g in enumerate(self.gpus):
            g._last_t = now
            self._driver_t[i] = now

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return index

    def _gpu(self, handle: int, call: str) -> StandinGpu:
        g = self.gpus[handle]
        if call in g.unsupported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        self._advance(handle)
        return g

    def _advance(self, handle: int) -> None:
        """Integrate power into the energy counter and log driver samples up to now (1 ms steps)."""
        g, now = self.gpus[handle], self.wall()
        t = g._last_t if g._last_t is not None else now
        dt = 0.001
        while t + dt <= now:
            g.energy_mj += g.power_w(t + dt / 2) * dt * 1e3
            t += dt
        g._last_t = t
        dt_s = self._driver_t.get(handle, now)
        while dt_s + self.driver_rate_s <= now:
            dt_s += self.driver_rate_s
            g.driver_samples.append((int(dt_s * 1e6), g.util(dt_s)))
        self._driver_t[handle] = dt_s

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self._gpu(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        g = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        return pynvml.c_nvmlUtilization_t(gpu=round(g.util(self.wall())), memory=0)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        g = self._gpu(handle, "nvmlDeviceGetPowerUsage")
        return int(g.power_w(self.wall()) * 1e3)  # milliwatts

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        return int(self._gpu(handle, "nvmlDeviceGetTotalEnergyConsumption").energy_mj)  # millijoules

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: Any = None) -> Any:
        g = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        return pynvml.c_nvmlMemory_t(total=80 << 30, free=(80 << 30) - g.mem_used, used=g.mem_used)

    def nvmlDeviceGetClockInfo(self, handle: int, type: int) -> int:
        assert type == NVML_CLOCK_SM
        return self._gpu(handle, "nvmlDeviceGetClockInfo").sm_clock

    def nvmlDeviceGetSamples(self, device: int, sampling_type: int, timeStamp: int) -> tuple[int, list[Any]]:
        assert sampling_type == NVML_GPU_UTILIZATION_SAMPLES
        g = self._gpu(device, "nvmlDeviceGetSamples")
        newer = [(ts, u) for ts, u in g.driver_samples if ts > timeStamp]
        if not newer:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return (NVML_VALUE_TYPE_UNSIGNED_INT,
                [pynvml.c_nvmlSample_t(timeStamp=ts, sampleValue=pynvml.c_nvmlValue_t(uiVal=int(u)))
                 for ts, u in newer])

"""A stand-in for the `pynvml` module (nvidia-ml-py), for tests on machines without an NVIDIA GPU.

It is not NVML: it has the same names, signatures, return shapes and error classes as the pynvml calls
stopstorm makes (read from nvidia-ml-py 13.615's pynvml.py), over scripted GPUs whose utilisation and power
are functions of time. Energy is the integral of that power, so a test can check figures against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

NVML_CLOCK_SM = 1
NVML_GPU_UTILIZATION_SAMPLES = 1
NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_UNKNOWN = 999


class NVMLError(Exception):
    """pynvml maps each code to a subclass in __new__; so does this."""

    _classes: dict[int, type] = {}

    def __new__(cls, value: int):
        if cls is NVMLError:
            cls = NVMLError._classes.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        names = {3: "Not Supported", 6: "Not Found", 12: "NVML Shared Library Not Found"}
        return names.get(self.value, "Unknown Error")


def _error_class(name: str, code: int) -> type:
    def new(cls, *_args):
        return NVMLError.__new__(cls, code)

    def init(self, *_args):
        Exception.__init__(self, code)
        self.value = code

    klass = type(name, (NVMLError,), {"__new__": new, "__init__": init})
    NVMLError._classes[code] = klass
    return klass


NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NotFound = _error_class("NVMLError_NotFound", NVML_ERROR_NOT_FOUND)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_Unknown = _error_class("NVMLError_Unknown", NVML_ERROR_UNKNOWN)


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
        for name in ("NVML_CLOCK_SM", "NVML_GPU_UTILIZATION_SAMPLES", "NVMLError", "NVMLError_NotSupported",
                     "NVMLError_NotFound", "NVMLError_LibraryNotFound", "NVMLError_Unknown"):
            setattr(self, name, globals()[name])

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
            raise NVMLError(2)
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
        return SimpleNamespace(gpu=round(g.util(self.wall())), memory=0)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        g = self._gpu(handle, "nvmlDeviceGetPowerUsage")
        return int(g.power_w(self.wall()) * 1e3)  # milliwatts

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        return int(self._gpu(handle, "nvmlDeviceGetTotalEnergyConsumption").energy_mj)  # millijoules

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: Any = None) -> Any:
        g = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(total=80 << 30, free=(80 << 30) - g.mem_used, used=g.mem_used)

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
                [SimpleNamespace(timeStamp=ts, sampleValue=SimpleNamespace(uiVal=int(u))) for ts, u in newer])

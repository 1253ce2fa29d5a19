"""GPU readings over a run, from NVML on this host or from a DCGM exporter on another, in one shape.

A background greenlet reads each chosen GPU every `interval` seconds (100 ms by default): utilisation,
power, the driver's total-energy counter, memory used and SM clock. NVML also keeps its own utilisation
samples at a higher rate than one poll can see (`nvmlDeviceGetSamples(..., NVML_GPU_UTILIZATION_SAMPLES,
last_seen)`); those are collected too, so the moment a GPU goes idle after a Stop is known to the driver's
resolution rather than to ours. Their timestamps are the driver's microseconds of wall-clock time, converted
to `time.monotonic()` (the clock of the stream records) with one offset taken at start.

A reading NVML does not support on a device (`NVMLError_NotSupported`) is None and not asked again; any other
NVML error is counted, kept as text, and the reading is None for that poll. Nothing here raises into a run,
except `open()`, which raises `GpuUnavailable` with the reason in words so the caller can print one line.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from stopstorm.metrics.truth.poller import Poller

__all__ = [
    "GpuDevice",
    "GpuReadings",
    "GpuSample",
    "GpuSource",
    "GpuUnavailable",
    "NvmlSampler",
    "PolledSampler",
    "UtilSample",
    "readings_of",
]


class GpuUnavailable(RuntimeError):
    """No GPU figures this run; the message says why, in words."""


@dataclass(frozen=True, slots=True)
class GpuDevice:
    index: int
    name: str | None = None
    uuid: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "uuid": self.uuid}


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One poll of one GPU. `t` is time.monotonic(); any reading may be None (unsupported or failed)."""

    t: float
    gpu: int
    util_pct: float | None
    power_w: float | None
    energy_j: float | None  # the driver's total-energy counter (since driver load), not a delta
    mem_used_bytes: int | None
    sm_clock_mhz: float | None


@dataclass(frozen=True, slots=True)
class UtilSample:
    """One of the driver's own utilisation samples (NVML keeps them at a higher rate than we poll)."""

    t: float
    gpu: int
    util_pct: float


@dataclass(frozen=True, slots=True)
class GpuReadings:
    """What a GPU source read over a run: the snapshot the report is built from."""

    name: str  # "nvml" or "dcgm"
    interval: float
    devices: tuple[GpuDevice, ...]
    samples: tuple[GpuSample, ...]
    util_samples: tuple[UtilSample, ...]
    errors: int
    last_error: str | None

    @property
    def source(self) -> str:
        """The source in words, as figures name it."""
        return "DCGM exporter" if self.name == "dcgm" else "NVML"


def readings_of(source: GpuSource) -> GpuReadings:
    """A snapshot of what `source` has read so far."""
    return GpuReadings(source.name, source.interval, tuple(source.devices), tuple(source.samples),
                       tuple(source.util_samples), source.errors, source.last_error)


class GpuSource(Protocol):
    """What the hooks and the report need of a GPU source (NVML here, a DCGM exporter there)."""

    name: str
    interval: float
    devices: list[GpuDevice]
    samples: list[GpuSample]
    util_samples: list[UtilSample]
    errors: int
    last_error: str | None

    def open(self) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class PolledSampler(Poller):
    """The greenlet, the sample lists and the error count every source shares; `poll()` is the source's."""

    name = "none"
    what = "GPU sampler"

    def __init__(self, interval: float = 0.1, max_samples: int = 1_000_000) -> None:
        if interval <= 0:
            raise ValueError(f"the GPU sample interval must be above 0 s, got {interval}")
        self.interval = interval
        self.max_samples = max_samples
        self.devices: list[GpuDevice] = []
        self.samples: list[GpuSample] = []
        self.util_samples: list[UtilSample] = []
        self.errors = 0
        self.last_error: str | None = None
        super().__init__()

    def open(self) -> None:
        """Find the devices; raise GpuUnavailable (reason in words) when there are none to read."""

    def poll(self) -> None:
        raise NotImplementedError

    def sample_once(self) -> None:
        """One poll of every device; never raises."""
        try:
            self.poll()
        except Exception as exc:  # a failed poll is data, not a crash
            self._error(exc)
        if len(self.samples) > self.max_samples:  # bounded memory on a very long run: keep the newer half
            del self.samples[: len(self.samples) // 2]
        if len(self.util_samples) > self.max_samples:
            del self.util_samples[: len(self.util_samples) // 2]

    def _error(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    def read_once(self) -> None:
        self.sample_once()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop polling, with one last reading so the run's end is in the timeline."""
        if self.halt(timeout):
            self.sample_once()
        self.close()

    def close(self) -> None:
        """Release what open() took."""


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlSampler(PolledSampler):
    """NVML (pynvml, from the `nvidia-ml-py` package) on the host this process runs on.

    `nvml` is the module to call: pynvml itself, or a stand-in with the same surface in tests.
    """

    name = "nvml"

    def __init__(self, indices: Sequence[int] | None = None, interval: float = 0.1, nvml: Any = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        super().__init__(interval)
        self.indices = list(indices) if indices is not None else None
        self._nvml = nvml
        self._clock = clock
        self._wall = wall
        self._handles: list[tuple[int, Any]] = []
        self._unsupported: set[tuple[int, str]] = set()
        self._last_ts: dict[int, int] = {}
        self._wall_to_mono = 0.0
        self._initialised = False

    def open(self) -> None:
        nvml = self._nvml
        if nvml is None:
            try:
                with warnings.catch_warnings():
                    # The old `pynvml` distribution, if also installed, warns that it is deprecated in favour of
                    # nvidia-ml-py, which is what stopstorm depends on and what this imports.
                    warnings.filterwarnings("ignore", message="The pynvml package is deprecated",
                                            category=FutureWarning)
                    import pynvml  # only a GPU run needs it
            except ImportError as exc:
                raise GpuUnavailable(f"pynvml is not installed ({exc}); pip install nvidia-ml-py") from None
            nvml = self._nvml = pynvml
        try:
            nvml.nvmlInit()
        except (nvml.NVMLError, OSError) as exc:
            raise GpuUnavailable(f"NVML could not start: {exc}") from None
        self._initialised = True
        try:
            count = nvml.nvmlDeviceGetCount()
            wanted = self.indices if self.indices is not None else list(range(count))
            bad = [i for i in wanted if not 0 <= i < count]
            if bad:
                raise GpuUnavailable(f"--gpu-indices {','.join(map(str, bad))} not present: NVML sees {count} GPU(s)")
            if not wanted:
                raise GpuUnavailable("NVML sees no GPU on this host")
            for i in wanted:
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                self._handles.append((i, handle))
                self.devices.append(GpuDevice(i, self._maybe(i, "name", nvml.nvmlDeviceGetName, handle),
                                              self._maybe(i, "uuid", nvml.nvmlDeviceGetUUID, handle)))
        except GpuUnavailable:
            self.close()
            raise
        except nvml.NVMLError as exc:
            self.close()
            raise GpuUnavailable(f"NVML could not open the GPUs: {exc}") from None
        self._wall_to_mono = self._clock() - self._wall()
        # Only samples from now on: the driver's buffer also holds the seconds before the run.
        start_us = int(self._wall() * 1e6)
        self._last_ts = {i: start_us for i, _ in self._handles}

    def close(self) -> None:
        if self._initialised and self._nvml is not None:
            self._initialised = False
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                self._error(exc)

    def _maybe(self, gpu: int, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """One NVML call; None when unsupported (never asked again) or failed (counted)."""
        if (gpu, what) in self._unsupported:
            return None
        nvml = self._nvml
        assert nvml is not None
        try:
            value = fn(*args)
        except nvml.NVMLError_NotSupported:
            self._unsupported.add((gpu, what))
            return None
        except nvml.NVMLError as exc:
            self._error(exc)
            return None
        return _text(value) if what in ("name", "uuid") else value

    def poll(self) -> None:
        nvml = self._nvml
        assert nvml is not None
        for gpu, h in self._handles:
            util = self._maybe(gpu, "util", nvml.nvmlDeviceGetUtilizationRates, h)
            power_mw = self._maybe(gpu, "power", nvml.nvmlDeviceGetPowerUsage, h)
            energy_mj = self._maybe(gpu, "energy", nvml.nvmlDeviceGetTotalEnergyConsumption, h)
            mem = self._maybe(gpu, "memory", nvml.nvmlDeviceGetMemoryInfo, h)
            clock = self._maybe(gpu, "sm_clock", nvml.nvmlDeviceGetClockInfo, h, nvml.NVML_CLOCK_SM)
            self.samples.append(GpuSample(
                t=self._clock(), gpu=gpu,
                util_pct=float(util.gpu) if util is not None else None,
                power_w=power_mw / 1e3 if power_mw is not None else None,
                energy_j=energy_mj / 1e3 if energy_mj is not None else None,
                mem_used_bytes=int(mem.used) if mem is not None else None,
                sm_clock_mhz=float(clock) if clock is not None else None))
            self._driver_samples(gpu, h)

    def _driver_samples(self, gpu: int, handle: Any) -> None:
        """The driver's utilisation samples since the last one we took, on our monotonic clock."""
        nvml = self._nvml
        assert nvml is not None
        if (gpu, "util_samples") in self._unsupported:
            return
        try:
            got = nvml.nvmlDeviceGetSamples(handle, nvml.NVML_GPU_UTILIZATION_SAMPLES, self._last_ts[gpu])
        except nvml.NVMLError_NotFound:  # nothing newer than the last one: not an error
            return
        except nvml.NVMLError_NotSupported:
            self._unsupported.add((gpu, "util_samples"))
            return
        except nvml.NVMLError as exc:
            self._error(exc)
            return
        value_type, samples = got
        field = _VALUE_FIELDS.get(value_type, "uiVal")
        for s in samples:
            ts = int(s.timeStamp)
            if ts <= self._last_ts[gpu]:
                continue
            self._last_ts[gpu] = ts
            self.util_samples.append(UtilSample(ts / 1e6 + self._wall_to_mono, gpu,
                                                float(getattr(s.sampleValue, field))))


# nvmlValueType_t → the c_nvmlValue_t member holding it (pynvml's NVML_VALUE_TYPE_* order).
_VALUE_FIELDS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}

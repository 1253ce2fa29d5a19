"""A DCGM exporter as a GPU source, for a GPU on another host (`--dcgm-url http://gpu-host:9400/metrics`).

dcgm-exporter serves Prometheus text; it is parsed with prometheus_client's parser, as vLLM's /metrics is.
Read, per GPU (label `gpu`): `DCGM_FI_DEV_GPU_UTIL` (%), `DCGM_FI_DEV_POWER_USAGE` (W),
`DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` (mJ since boot), `DCGM_FI_DEV_FB_USED` (MiB) and, when exported,
`DCGM_FI_DEV_SM_CLOCK` (MHz). A field the exporter does not export is None, never 0 (the DCP profile, for one,
has no GPU_UTIL). With MIG, device-level fields are repeated once per GPU instance (`GPU_I_ID`), with small
differences between the copies: the whole-GPU line wins, else the first instance's line.

The exporter refreshes its readings on its own collect interval (30 s by default, `-c` in ms): scraping faster
than that repeats readings, and a drop in utilisation is seen to that resolution only. The hook warns nothing
about that; the report records the source, so a reader knows.
"""

from __future__ import annotations

import time
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from stopstorm.metrics.truth.gpu import GpuDevice, GpuSample, GpuUnavailable, PolledSampler

__all__ = ["DCGM_FIELDS", "DcgmSampler", "parse_dcgm"]

# exporter field → (GpuSample field, factor to its unit)
DCGM_FIELDS: dict[str, tuple[str, float]] = {
    "DCGM_FI_DEV_GPU_UTIL": ("util_pct", 1.0),
    "DCGM_FI_DEV_POWER_USAGE": ("power_w", 1.0),
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": ("energy_j", 1e-3),
    "DCGM_FI_DEV_FB_USED": ("mem_used_bytes", float(1 << 20)),
    "DCGM_FI_DEV_SM_CLOCK": ("sm_clock_mhz", 1.0),
}


def parse_dcgm(text: str, at: float) -> tuple[list[GpuSample], list[GpuDevice]]:
    """One exporter page as one sample per GPU (sorted by index), and the GPUs it names."""
    values: dict[int, dict[str, tuple[bool, float]]] = {}  # gpu → field → (whole-GPU line?, value)
    devices: dict[int, GpuDevice] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            spec = DCGM_FIELDS.get(sample.name)
            gpu_label = sample.labels.get("gpu")
            if spec is None or gpu_label is None or not gpu_label.isdigit():
                continue
            gpu = int(gpu_label)
            devices.setdefault(gpu, GpuDevice(gpu, sample.labels.get("modelName"), sample.labels.get("UUID")))
            whole = "GPU_I_ID" not in sample.labels
            field, factor = spec
            seen = values.setdefault(gpu, {}).get(field)
            if seen is None or (whole and not seen[0]):
                values[gpu][field] = (whole, sample.value * factor)
    out = []
    for gpu in sorted(values):
        v = {k: val for k, (_, val) in values[gpu].items()}
        mem = v.get("mem_used_bytes")
        out.append(GpuSample(t=at, gpu=gpu, util_pct=v.get("util_pct"), power_w=v.get("power_w"),
                             energy_j=v.get("energy_j"), mem_used_bytes=int(mem) if mem is not None else None,
                             sm_clock_mhz=v.get("sm_clock_mhz")))
    return out, [devices[g] for g in sorted(devices)]


class DcgmSampler(PolledSampler):
    """Polls a dcgm-exporter URL in a greenlet; `indices` keeps only those GPUs (None: all it exports)."""

    name = "dcgm"

    def __init__(self, url: str, indices: list[int] | None = None, interval: float = 0.1, timeout: float = 2.0,
                 session: Any = None) -> None:
        super().__init__(interval)
        self.url = url
        self.indices = indices
        self.timeout = timeout
        self._own_session = session is None
        self.session = session if session is not None else requests.Session()

    def _read(self) -> tuple[list[GpuSample], list[GpuDevice]]:
        resp = self.session.get(self.url, timeout=self.timeout)
        at = time.monotonic()
        resp.raise_for_status()
        samples, devices = parse_dcgm(resp.text, at)
        if self.indices is not None:
            samples = [s for s in samples if s.gpu in self.indices]
            devices = [d for d in devices if d.index in self.indices]
        return samples, devices

    def open(self) -> None:
        try:
            samples, devices = self._read()
        except Exception as exc:
            raise GpuUnavailable(f"the DCGM exporter at {self.url} could not be read: "
                                 f"{type(exc).__name__}: {exc}") from None
        if not devices:
            wanted = f" among --gpu-indices {self.indices}" if self.indices is not None else ""
            raise GpuUnavailable(f"the DCGM exporter at {self.url} exports no GPU fields{wanted}")
        self.devices = devices
        self.samples.extend(samples)

    def poll(self) -> None:
        samples, _ = self._read()
        self.samples.extend(samples)

    def close(self) -> None:
        if self._own_session:
            self.session.close()

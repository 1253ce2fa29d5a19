"""The GPU hook: Locust options and listeners that sample the GPU through a run and add it to the report.

- Options (`stopstorm GPU` group; also in locust.conf, the web UI and STOPSTORM_* variables): `--gpu-indices`,
  `--gpu-interval`, `--dcgm-url`, `--no-gpu`, `--gpu-host-worker`, `--gpu-idle-pct`.
- Where it runs: on the master (or the single local process), unless `--gpu-host-worker` is given: then the
  master does not sample, and the worker started with that flag does (it sits on the GPU host). The choice is
  made at init from the process's own command line.
- test_start opens the source (NVML here, or the DCGM exporter at `--dcgm-url`) and starts its greenlet;
  test_stop stops it with a last reading. With no GPU, one line says GPU figures are off and why, and the run
  goes on.
- `readings()` (called by metrics/plugin/hooks.py as it builds the run's report) hands over what was read;
  the report's `gpu` section is built from it (metrics/analysis/gpu_attribution.py) and its files written
  from that (metrics/report/gpu_files.py).
  The Stop marks come from the stream records' Stop times.

A worker that samples writes its own timeline CSV and plot at quit, with its own users' Stops marked (the run's
stream records are the master's); joining the worker's timeline to the master's report is the distributed work's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from locust import events
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from stopstorm.metrics.analysis.gpu_attribution import IDLE_PCT, TIMELINE_COLUMNS, stop_marks, timeline_rows
from stopstorm.metrics.figures import Table
from stopstorm.metrics.plugin import options
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.report.gpu_files import gpu_file_names, write_table_csv, write_timeline_plot
from stopstorm.metrics.report.model import GPU_ON_WORKER
from stopstorm.metrics.truth.dcgm import DcgmSampler
from stopstorm.metrics.truth.gpu import GpuReadings, GpuSource, GpuUnavailable, NvmlSampler, readings_of

__all__ = ["gpu_sampler", "parse_indices", "readings"]

_log = logging.getLogger("stopstorm")


@dataclass
class _GpuRun:
    """This process's GPU sampling through one run."""

    sample: bool | None = None  # decided at init: this process samples (None: --no-gpu, or no options)
    sampling_worker: bool = False  # a worker on the GPU host (--gpu-host-worker)
    settings: tuple[list[int] | None, float, float, str] | None = None  # indices, interval, idle %, DCGM URL
    opts: Any = None
    off: str | None = None  # why there are no GPU figures
    tried: bool = False
    sampler: GpuSource | None = None
    started: float | None = None
    stopped: float | None = None
    worker_stops: list[StreamRecord] = field(default_factory=list)  # a sampling worker's own users' Stops


_gpu = _GpuRun()


def parse_indices(text: str) -> list[int] | None:
    """`--gpu-indices "0,2"` → [0, 2]; empty → None (every GPU). ValueError names the option."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        out = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--gpu-indices wants GPU numbers separated by commas, e.g. 0,1; got {text!r}") from None
    if any(i < 0 for i in out) or len(set(out)) != len(out):
        raise ValueError(f"--gpu-indices wants distinct GPU numbers ≥ 0, got {text!r}")
    return out


def _dcgm_url(url: str) -> None:
    if url and not url.startswith(("http://", "https://")):
        raise ValueError(f"--dcgm-url must be an http(s) URL such as http://gpu-host:9400/metrics, got {url!r}")


def _sampling(opts: Any) -> bool:
    return not getattr(opts, "no_gpu", False)


TABLE = options.OptionTable("stopstorm GPU", description="GPU utilisation, power and energy through the run (NVML or "
                            "a DCGM exporter), tied to each Stop", options=(
    options.Option("--gpu-indices", "GPUs to sample, by index, e.g. 0,1 (default: every GPU the source shows)", "",
                   options.Parsed(parse_indices, "GPU numbers, comma-separated"), when=_sampling),
    options.Option("--gpu-interval", "seconds between GPU readings (default 0.1); NVML's own higher-rate utilisation "
                   "samples are collected too", 0.1, options.seconds(low=0.001), float, when=_sampling),
    options.Option("--dcgm-url", "read a GPU on another host from its dcgm-exporter, e.g. "
                   "http://gpu-host:9400/metrics (default: NVML on this host)", "",
                   options.Parsed(_dcgm_url, "an http(s) URL"), when=_sampling),
    options.Option("--no-gpu", "no GPU figures this run", False),
    options.Option("--gpu-host-worker", "distributed runs: give it to the worker that runs on the GPU host (it "
                   "samples, the master does not); also to the master, so it leaves the sampling to that worker",
                   False),
    options.Option("--gpu-idle-pct", f"utilisation at or below which the GPU counts as idle after a Stop (default "
                   f"{IDLE_PCT:g})", IDLE_PCT, options.Number(low=0.0, high=100.0, below=True, unit="%"), float,
                   when=_sampling),
))


def gpu_sampler() -> GpuSource | None:
    """The sampler this process runs, if any (after test_start)."""
    return _gpu.sampler


def _settings(opts: Any) -> tuple[list[int] | None, float, float, str]:
    indices = parse_indices(getattr(opts, "gpu_indices", ""))
    TABLE.check(opts)  # each option's rule
    interval = float(getattr(opts, "gpu_interval", 0.1))
    idle = float(getattr(opts, "gpu_idle_pct", IDLE_PCT))
    url = getattr(opts, "dcgm_url", "") or ""
    return indices, interval, idle, url


def _check(opts: Any) -> None:
    if not getattr(opts, "no_gpu", False):
        _settings(opts)


options.register(TABLE, _check, rank=60)


@events.init.add_listener
def _choose_where_to_sample(environment: Environment, **_kwargs: Any) -> None:
    global _gpu
    _gpu = _GpuRun()
    opts = environment.parsed_options
    if opts is None or getattr(opts, "no_gpu", False):
        _gpu.off = "--no-gpu was given" if opts is not None else "no options"
        return
    try:
        # Kept from this process's own command line: a worker's options are overwritten by the master's later.
        _gpu.settings = _settings(opts)
    except ValueError:
        return  # refused with its option named by the plugin's option check (stopstorm/metrics/plugin/hooks.py)
    on_gpu_host = bool(getattr(opts, "gpu_host_worker", False))
    if isinstance(environment.runner, WorkerRunner):
        # Decided now, from this worker's own command line: the master's options overwrite a worker's later.
        _gpu.sample = _gpu.sampling_worker = on_gpu_host
    else:
        _gpu.sample = not on_gpu_host
        if not on_gpu_host and isinstance(environment.runner, MasterRunner):
            _log.info("stopstorm: GPU sampled on the master (give --gpu-host-worker to the worker on the GPU host "
                      "and to the master to sample there instead)")
    if not _gpu.sample:
        _gpu.off = GPU_ON_WORKER
    _gpu.opts = opts


@events.test_start.add_listener
def _start_sampling(environment: Environment, **_kwargs: Any) -> None:
    """A sampler per run: a later run from the web UI gets its own readings, from its own start."""
    if not _gpu.sample or _gpu.settings is None:
        return
    if _gpu.sampler is not None and _gpu.stopped is None:
        return  # this run's (a master may see test_start again)
    if _gpu.tried and _gpu.sampler is None:
        return  # the source did not open: said once, at the first run
    _gpu.tried = True
    _gpu.stopped = None
    _gpu.worker_stops.clear()
    indices, interval, _, url = _gpu.settings
    sampler: GpuSource = DcgmSampler(url, indices, interval) if url else NvmlSampler(indices, interval)
    try:
        sampler.open()
    except GpuUnavailable as exc:
        _gpu.off = str(exc)
        _log.warning("stopstorm: GPU figures are off because %s; the run goes on (--no-gpu to skip this line)",
                     exc)
        return
    except Exception as exc:  # never let the GPU hook stop a load test
        _gpu.off = f"{type(exc).__name__}: {exc}"
        _log.warning("stopstorm: GPU figures are off because opening the GPU source failed: %s; the run goes on",
                     _gpu.off)
        return
    _gpu.started = time.monotonic()
    sampler.start()
    _gpu.sampler = sampler
    names = ", ".join(f"{d.index}: {d.name or '?'}" for d in sampler.devices)
    _log.info("stopstorm: sampling GPU %s every %g s from %s", names, interval, url or "NVML")


@events.test_stop.add_listener
def _stop_sampling(**_kwargs: Any) -> None:
    sampler = _gpu.sampler
    if sampler is not None and _gpu.stopped is None:
        _gpu.stopped = time.monotonic()
        try:
            sampler.stop()
        except Exception as exc:
            _log.warning("stopstorm: stopping the GPU sampler failed: %s", exc)


def readings() -> tuple[GpuReadings | None, float, str | None]:
    """This process's GPU readings for the report (its sampler stopped first), the idle threshold, and why there
    are none (said once at test start; kept in the report)."""
    idle = _gpu.settings[2] if _gpu.settings is not None else IDLE_PCT
    if _gpu.sampler is None:
        return None, idle, _gpu.off
    _stop_sampling()
    return readings_of(_gpu.sampler), idle, None


@events.request.add_listener
def _worker_notes_its_stops(context: dict[str, Any] | None = None, **_kwargs: Any) -> None:
    """A sampling worker marks its own users' Stops on its timeline (the master has every record)."""
    if _gpu.sampler is None or not _gpu.sampling_worker:
        return
    record = (context or {}).get("record")
    if isinstance(record, StreamRecord) and record.stop is not None:
        _gpu.worker_stops.append(record)


@events.quit.add_listener
def _worker_writes_its_timeline(**_kwargs: Any) -> None:
    """A worker on the GPU host has no stream records: it keeps its timeline beside where a report would go."""
    sampler = _gpu.sampler
    opts = _gpu.opts
    if sampler is None or opts is None or not _gpu.sampling_worker:
        return
    _stop_sampling()
    start = _gpu.started or 0.0
    path = getattr(opts, "stopstorm_report", "") or "stopstorm-report.json"
    files = gpu_file_names(path, "gpu-timeline-worker")
    try:
        timeline = Table(TIMELINE_COLUMNS, timeline_rows(sampler.samples, start))
        write_table_csv(Path(str(files["timeline_csv"])), timeline)
        if files["plot_png"]:
            write_timeline_plot(Path(files["plot_png"]), timeline.rows, stop_marks(_gpu.worker_stops, start),
                                f"stopstorm GPU timeline, worker ({readings_of(sampler).source}; red: this worker's "
                                "Stops)")
        _log.info("stopstorm: this worker's GPU timeline: %s", files["timeline_csv"])
    except Exception as exc:
        _log.warning("stopstorm: writing this worker's GPU timeline failed: %s", exc)

"""The GPU hook's parts: the NVML sampler and the attribution driven through a stand-in NVML module
(tests/nvml_standin.py: pynvml's calls scripted over fake GPUs, since this machine has none; checked here
against pynvml's own signatures), the DCGM parser on real dcgm-exporter text
(tests/fixtures/dcgm-exporter/README.txt says where each came from), and the real pynvml on a machine
without a GPU."""

from __future__ import annotations

import ast
import http.server
import inspect
import threading
from pathlib import Path

import gevent
import pynvml
import pytest
from conftest import FIXTURES_DIR, ROOT
from nvml_standin import PASSED_THROUGH, StandinGpu, StandinNvml

from stopstorm.metrics.analysis.gpu_attribution import TIMELINE_COLUMNS, attribute, stop_marks, timeline_rows
from stopstorm.metrics.figures import Distribution
from stopstorm.metrics.record import StreamRecord
from stopstorm.metrics.truth.dcgm import DcgmSampler, parse_dcgm
from stopstorm.metrics.truth.gpu import GpuUnavailable, NvmlSampler

FIXTURES = FIXTURES_DIR / "dcgm-exporter"
MONO_OFFSET = 900.0  # the stand-in wall clock minus our monotonic clock
T0 = 1_000.0  # wall time the scripted GPU starts busy
BUSY_S = 1.0
DRIVER_RATE_S = 1 / 60


class FakeClock:
    """Wall and monotonic time, moved by the test (both advance together)."""

    def __init__(self, wall: float) -> None:
        self.t = wall

    def wall(self) -> float:
        return self.t

    def mono(self) -> float:
        return self.t - MONO_OFFSET


def step_gpu(**kw) -> StandinGpu:
    """Busy (90 %, 300 W) for BUSY_S from T0, then idle (0 %, 60 W): the seed's nvtop step."""
    return StandinGpu(util=lambda t: 90.0 if T0 <= t < T0 + BUSY_S else 0.0,
                      power_w=lambda t: 300.0 if T0 <= t < T0 + BUSY_S else 60.0, **kw)


def run_sampler(nvml: StandinNvml, clock: FakeClock, seconds: float, interval: float = 0.1) -> NvmlSampler:
    sampler = NvmlSampler(interval=interval, nvml=nvml, clock=clock.mono, wall=clock.wall)
    sampler.open()
    for _ in range(round(seconds / interval)):
        clock.t += interval
        sampler.sample_once()
    return sampler


def record(sent: float, stop: float | None, closed: float | None, request_id: str = "r1") -> StreamRecord:
    return StreamRecord(stack="requests", close_mode="close", endpoint="chat", request_id=request_id,
                        stop_plan="tokens:10", wall_start=0.0, sent=sent, stop=stop, closed=closed,
                        ended=None if stop is not None else closed)


# --- the stand-in against the real pynvml ------------------------------------------------------------------


def _nvml_names_the_sampler_uses() -> set[str]:
    """Every `nvml.X` / `self._nvml.X` the sampler reads, from its source."""
    tree = ast.parse(Path(inspect.getfile(NvmlSampler)).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            owner = node.value
            if (isinstance(owner, ast.Name) and owner.id == "nvml") or (
                    isinstance(owner, ast.Attribute) and owner.attr == "_nvml"):
                names.add(node.attr)
    return names


def test_the_standin_has_every_name_the_sampler_uses_with_pynvmls_signatures():
    used = _nvml_names_the_sampler_uses()
    assert {"nvmlInit", "nvmlDeviceGetSamples", "NVMLError_NotSupported"} <= used  # the walk found the calls
    standin = StandinNvml()
    for name in sorted(used):
        assert hasattr(pynvml, name), f"the sampler calls {name}, which pynvml does not have"
        assert hasattr(standin, name), f"the sampler uses {name}, which the stand-in lacks"
        if name in PASSED_THROUGH:
            assert getattr(standin, name) is getattr(pynvml, name)
        else:
            real = list(inspect.signature(getattr(pynvml, name)).parameters)
            ours = list(inspect.signature(getattr(standin, name)).parameters)
            assert ours == real, f"{name}: stand-in takes {ours}, pynvml takes {real}"


def test_the_standin_returns_pynvmls_structures_and_raises_its_errors():
    nvml = StandinNvml([StandinGpu(util=lambda t: 40.0, unsupported={"nvmlDeviceGetClockInfo"})])
    nvml.nvmlInit()
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    assert isinstance(nvml.nvmlDeviceGetUtilizationRates(h), pynvml.c_nvmlUtilization_t)
    assert isinstance(nvml.nvmlDeviceGetMemoryInfo(h), pynvml.c_nvmlMemory_t)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetHandleByIndex(1)


# --- the sampler -------------------------------------------------------------------------------------------


def test_sampler_reads_every_field_in_its_units():
    clock = FakeClock(T0)
    nvml = StandinNvml([step_gpu()], wall=clock.wall, driver_rate_s=DRIVER_RATE_S)
    s = run_sampler(nvml, clock, 2.0)
    assert s.devices[0].name == "Stand-in GPU" and s.devices[0].uuid == "GPU-standin-0"
    assert len(s.samples) == 20 and s.errors == 0
    busy, idle = s.samples[3], s.samples[-1]
    assert busy.util_pct == 90.0 and busy.power_w == 300.0 and busy.sm_clock_mhz == 1410.0
    assert busy.mem_used_bytes == 1 << 30
    assert idle.util_pct == 0.0 and idle.power_w == 60.0
    assert busy.t == pytest.approx(T0 + 0.4 - MONO_OFFSET)
    # the counter is the integral of the scripted power: 300 W × 1 s + 60 W × (2 − 0.1) s after the first poll
    assert s.samples[-1].energy_j - s.samples[0].energy_j == pytest.approx(300 * 0.9 + 60 * 1.0, rel=0.01)


def test_driver_utilisation_samples_come_at_their_rate_on_the_monotonic_clock():
    clock = FakeClock(T0)
    s = run_sampler(StandinNvml([step_gpu()], wall=clock.wall, driver_rate_s=DRIVER_RATE_S), clock, 2.0)
    assert len(s.util_samples) == pytest.approx(2.0 / DRIVER_RATE_S, abs=2)
    times = [u.t for u in s.util_samples]
    assert times == sorted(times) and len(set(times)) == len(times)  # none twice across polls
    first_idle = next(u for u in s.util_samples if u.util_pct == 0.0)
    assert first_idle.t - (T0 + BUSY_S - MONO_OFFSET) == pytest.approx(0, abs=DRIVER_RATE_S + 1e-6)


def test_unsupported_readings_are_none_and_not_asked_again():
    clock = FakeClock(T0)
    gpu = step_gpu(unsupported={"nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetSamples",
                                "nvmlDeviceGetClockInfo"})
    s = run_sampler(StandinNvml([gpu], wall=clock.wall), clock, 1.0)
    assert all(x.energy_j is None and x.sm_clock_mhz is None for x in s.samples)
    assert s.util_samples == [] and s.errors == 0
    assert (0, "energy") in s._unsupported


def test_nvml_init_failure_is_one_reason_in_words():
    with pytest.raises(GpuUnavailable, match="NVML could not start: NVML Shared Library Not Found"):
        NvmlSampler(nvml=StandinNvml(fail_init=True)).open()


def test_bad_gpu_index_names_the_option():
    with pytest.raises(GpuUnavailable, match=r"--gpu-indices 3 not present: NVML sees 1 GPU"):
        NvmlSampler(indices=[3], nvml=StandinNvml()).open()


def _skip_where_nvml_works(what: str) -> None:
    """The no-GPU tests need real pynvml on a machine without a working NVML."""
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return
    pynvml.nvmlShutdown()
    pytest.skip(f"this machine has a working NVML: the {what} cannot be seen here")


def test_real_pynvml_without_a_gpu_says_why():
    _skip_where_nvml_works("no-GPU path")
    with pytest.raises(GpuUnavailable, match="NVML could not start"):
        NvmlSampler().open()


def test_greenlet_polls_at_its_interval_and_stops_with_a_last_reading():
    nvml = StandinNvml([StandinGpu(util=lambda t: 50.0)])
    s = NvmlSampler(interval=0.05, nvml=nvml)
    s.open()
    s.start()
    gevent.sleep(0.32)
    s.stop()
    # 0.32 s / 0.05 s plus the last reading is 7-8; fewer only if this shared machine starved the greenlet
    assert 3 <= len(s.samples) <= 9, len(s.samples)
    assert not s.alive and nvml.shutdowns == 1


# --- attribution -------------------------------------------------------------------------------------------


def test_attribution_on_the_step_waveform():
    clock = FakeClock(T0 - 0.5)
    s = run_sampler(StandinNvml([step_gpu()], wall=clock.wall, driver_rate_s=DRIVER_RATE_S), clock, 3.0)
    start, end = T0 - 0.5 - MONO_OFFSET, T0 + 2.5 - MONO_OFFSET
    stop = T0 + BUSY_S - 0.05 - MONO_OFFSET  # the user pressed Stop 50 ms before the GPU went idle
    recs = [record(start + 0.1, stop, stop + 0.001)]
    g = attribute(s.samples, s.util_samples, start, end, recs, delivered_tokens=300, wasted_tokens=100,
                  source="NVML", tokens_source="simulator ledger")
    assert g.gpu_busy_seconds.value == pytest.approx(0.9 * BUSY_S, abs=0.02)
    expected_j = 300 * BUSY_S + 60 * (3.0 - BUSY_S - 0.1)  # from the first poll to the last
    assert g.energy.value == pytest.approx(expected_j, rel=0.02) and g.energy.unit == "J"
    assert g.energy_per_delivered_token.value == pytest.approx(g.energy.value / 300)
    assert g.wasted_energy.value == pytest.approx(g.energy.value * 100 / 400)
    assert g.wasted_gpu_seconds.value == pytest.approx(g.gpu_busy_seconds.value / 4)
    assert g.idle_stops.value == 1
    d = g.stop_to_idle.value
    assert isinstance(d, Distribution) and 0.05 <= d.p50 <= 0.05 + DRIVER_RATE_S + 1e-6
    ((stack, mode, n, cell),) = g.cells
    assert (stack, mode, n.value, cell.value.p50) == ("requests", "close", 1, d.p50)


def test_stop_with_another_stream_in_flight_did_not_leave_the_gpu_idle():
    clock = FakeClock(T0 - 0.5)
    s = run_sampler(StandinNvml([step_gpu()], wall=clock.wall), clock, 3.0)
    stop = T0 + 0.5 - MONO_OFFSET
    recs = [record(stop - 0.4, stop, stop + 0.001), record(stop - 0.3, None, T0 + 1.2 - MONO_OFFSET, "r2")]
    g = attribute(s.samples, s.util_samples, T0 - 0.5 - MONO_OFFSET, T0 + 2.5 - MONO_OFFSET, recs,
                  delivered_tokens=10, wasted_tokens=0, source="NVML", tokens_source="simulator ledger")
    assert g.idle_stops.value == 0 and g.stop_to_idle.value is None
    assert g.wasted_energy.value == 0


def test_a_cells_waste_is_its_share_of_the_generated_tokens():
    from stopstorm.metrics.analysis.gpu_attribution import waste_share

    clock = FakeClock(T0 - 0.5)
    s = run_sampler(StandinNvml([step_gpu()], wall=clock.wall), clock, 3.0)
    g = attribute(s.samples, s.util_samples, T0 - 0.5 - MONO_OFFSET, T0 + 2.5 - MONO_OFFSET, [],
                  delivered_tokens=300, wasted_tokens=100, source="NVML", tokens_source="simulator ledger")
    busy, energy = waste_share(g, 25, 300, 100)
    assert energy.value == pytest.approx(g.energy.value * 25 / 400)
    assert busy.value == pytest.approx(g.gpu_busy_seconds.value * 25 / 400)
    assert energy.source == "NVML + simulator ledger"
    assert waste_share(g, None, 300, 100)[1].value is None


def test_energy_falls_back_to_power_integral_and_says_so():
    clock = FakeClock(T0 - 0.5)
    gpu = step_gpu(unsupported={"nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetSamples"})
    s = run_sampler(StandinNvml([gpu], wall=clock.wall), clock, 3.0)
    g = attribute(s.samples, s.util_samples, T0 - 0.5 - MONO_OFFSET, T0 + 2.5 - MONO_OFFSET, [],
                  delivered_tokens=None, wasted_tokens=None, source="NVML", tokens_source="client records")
    assert g.energy.value == pytest.approx(300 * BUSY_S + 60 * 1.9, rel=0.05)
    assert "∫ power dt" in g.energy.note
    assert g.energy_per_delivered_token.value is None and g.wasted_energy.value is None


def test_timeline_rows_and_stop_marks_count_from_the_run_start():
    clock = FakeClock(T0)
    s = run_sampler(StandinNvml([step_gpu(), step_gpu(uuid="GPU-standin-1")], wall=clock.wall), clock, 0.5)
    start = T0 - MONO_OFFSET
    rows = timeline_rows(s.samples, start)
    assert len(rows) == 10 and all(len(r) == len(TIMELINE_COLUMNS) for r in rows)
    assert [r[1] for r in rows[:2]] == [0, 1] and rows[0][0] == pytest.approx(0.1)
    assert rows[0][4] == 0 and rows[-1][4] > 0  # energy since each GPU's first reading
    assert stop_marks([record(start, start + 0.25, start + 0.3), record(start, None, start + 1)], start) == [0.25]


# --- DCGM exporter, on real exporter text ---------------------------------------------------------------


def test_dcgm_a100_docs_sample():
    samples, devices = parse_dcgm((FIXTURES / "a100-nvidia-docs.txt").read_text(), at=5.0)
    assert [d.uuid for d in devices] == ["GPU-34319582-d595-d1c7-d1d2-179bcfa61660"]
    (s,) = samples
    assert (s.t, s.gpu, s.power_w, s.sm_clock_mhz) == (5.0, 0, 409.692, 1215.0)
    assert s.energy_j == pytest.approx(319159.391)
    assert s.mem_used_bytes == 4845 * 2**20
    assert s.util_pct is None  # this exporter profile has no GPU_UTIL: unknown, not 0


def test_dcgm_v100_issue_output_with_help_and_type():
    samples, devices = parse_dcgm((FIXTURES / "v100-issue250-excerpt.txt").read_text(), at=0.0)
    assert [(s.gpu, s.util_pct, s.power_w) for s in samples] == [(0, 0.0, None)]
    assert devices[0].name == "Tesla V100-SXM2-32GB"


def test_dcgm_mig_copies_give_one_reading_per_gpu():
    power, _ = parse_dcgm((FIXTURES / "a30-mig-issue317-power.txt").read_text(), at=0.0)
    assert [(s.gpu, s.power_w) for s in power] == [(0, 52.636), (1, 56.121)]
    energy, _ = parse_dcgm((FIXTURES / "a30-mig-issue317-energy.txt").read_text(), at=0.0)
    assert [(s.gpu, s.energy_j) for s in energy] == [(2, pytest.approx(138249198.597)),
                                                     (3, pytest.approx(135188274.123))]


@pytest.fixture
def exporter():
    """The A100 sample served over loopback HTTP, as dcgm-exporter serves it."""
    body = (FIXTURES / "a100-nvidia-docs.txt").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_dcgm_sampler_over_http(exporter):
    s = DcgmSampler(f"{exporter}/metrics")
    s.open()
    s.sample_once()
    s.close()
    assert [d.index for d in s.devices] == [0] and len(s.samples) == 2 and s.errors == 0
    with pytest.raises(GpuUnavailable, match="exports no GPU fields among --gpu-indices"):
        DcgmSampler(f"{exporter}/metrics", indices=[1]).open()
    with pytest.raises(GpuUnavailable, match="could not be read: HTTPError"):
        DcgmSampler(f"{exporter}/nope").open()


# --- the hook: the report section, its files and the no-GPU line -------------------------------------------


def test_report_section_follows_the_contract_and_writes_csv_and_plot(tmp_path):
    from stopstorm.metrics.analysis.accounting import account
    from stopstorm.metrics.analysis.gpu_attribution import gpu_section
    from stopstorm.metrics.report.console import format_gpu
    from stopstorm.metrics.report.gpu_files import gpu_file_names, write_gpu_files
    from stopstorm.metrics.truth.gpu import readings_of

    clock = FakeClock(T0 - 0.5)
    s = run_sampler(StandinNvml([step_gpu()], wall=clock.wall, driver_rate_s=DRIVER_RATE_S), clock, 3.0)
    start, end = T0 - 0.5 - MONO_OFFSET, T0 + 2.5 - MONO_OFFSET
    stop = T0 + BUSY_S - 0.05 - MONO_OFFSET
    rec = record(start + 0.1, stop, stop + 0.001)
    rec.tokens, rec.tokens_at_stop = 40, 40
    acc = account([rec], None, None, end - start)
    section = gpu_section(readings_of(s), acc, [rec], start, end, gpu_file_names(str(tmp_path / "rep.json")))
    write_gpu_files(section)
    lines = format_gpu(section)
    g = section.to_json()
    assert g["source"] == "nvml" and g["devices"] == [{"index": 0, "name": "Stand-in GPU", "uuid": "GPU-standin-0"}]
    assert g["timeline"]["columns"] == ["t_s", "gpu", "util_pct", "power_w", "energy_j", "mem_used_bytes",
                                        "sm_clock_mhz"]
    assert len(g["timeline"]["rows"]) == 30 and g["stop_marks_s"] == [pytest.approx(1.45)]
    assert g["energy_per_delivered_token"]["value"] == pytest.approx(g["energy"]["value"] / 40)
    assert g["energy_per_delivered_token"]["unit"] == "J/token"
    assert g["energy_per_delivered_token"]["source"] == "NVML + client records"
    assert g["wasted_energy"] == {"value": None, "unit": "J", "source": "unavailable",
                                  "note": "needs wasted tokens (server truth)"}  # no ledger: no waste truth
    assert 0.05 <= g["stop_to_idle"]["value"]["p50"] <= 0.05 + DRIVER_RATE_S + 1e-6
    csv_text = (tmp_path / "rep-gpu-timeline.csv").read_text().splitlines()
    assert csv_text[0] == ",".join(g["timeline"]["columns"]) and len(csv_text) == 31
    stops = (tmp_path / "rep-gpu-stops.csv").read_text().splitlines()
    assert stops[0] == "t_s,stack,close_mode,request_id,stop_to_idle_s"
    t_s, stack, mode, rid, idle_s = stops[1].split(",")
    assert (float(t_s), stack, mode, rid) == (pytest.approx(1.45), "requests", "close", "r1")
    assert float(idle_s) == pytest.approx(g["stop_to_idle"]["value"]["p50"], abs=1e-4)
    if g["files"]["plot_png"] is not None:
        assert (tmp_path / "rep-gpu-timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("Stop → GPU idle" in line and "p50" in line for line in lines)
    assert [(c["stack"], c["close_mode"], c["idle_stops"]["value"]) for c in g["cells"]] == [("requests", "close", 1)]
    assert g["cells"][0]["wasted_energy"]["value"] is None  # no ledger: no waste truth, per cell either


@pytest.mark.slow
def test_headless_run_without_a_gpu_says_so_once_and_completes(tmp_path):
    import json
    import subprocess
    import sys

    _skip_where_nvml_works("no-GPU line")
    root = ROOT
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "-u", "2", "-r", "2", "-t", "3s",
           "--sim-args", "--step-base-ms 5", "--stopstorm-report", str(report), "--only-summary"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=90)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert [line for line in text.splitlines() if "GPU figures are off because" in line] != []
    assert len([line for line in text.splitlines() if "GPU figures are off" in line]) == 1, text[-3000:]
    doc = json.loads(report.read_text())
    assert "gpu" not in doc and doc["meta"]["gpu"]["off"].startswith("NVML could not start")
    assert doc["overall"]["figures"]["streams"]["value"] > 0


@pytest.mark.slow
def test_headless_run_reads_a_dcgm_exporter_into_the_report(tmp_path, exporter):
    """The whole hook over real exporter text: started at test start, stopped at test stop, in the report."""
    import json
    import subprocess
    import sys

    root = ROOT
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "-u", "2", "-r", "2", "-t", "2s",
           "--sim-args", "--step-base-ms 5", "--stopstorm-report", str(report), "--only-summary",
           "--dcgm-url", f"{exporter}/metrics", "--gpu-interval", "0.2", "--stop-probability", "1"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=90)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "GPU figures are off" not in text and "GPU (DCGM exporter, 1 GPU):" in text
    g = json.loads(report.read_text())["gpu"]
    assert g["source"] == "dcgm" and g["devices"][0]["uuid"] == "GPU-34319582-d595-d1c7-d1d2-179bcfa61660"
    rows = g["timeline"]["rows"]
    assert len(rows) >= 8 and {r[3] for r in rows} == {409.692}  # ~2 s at 0.2 s, plus the opening read
    assert g["energy"]["value"] == 0 and g["gpu_busy_seconds"]["value"] is None  # a static page: no Δ, no util
    assert g["stop_marks_s"] and all(0 <= m <= 3 for m in g["stop_marks_s"])
    assert (tmp_path / "report-gpu-timeline.csv").exists()


@pytest.mark.slow
def test_each_web_ui_run_samples_the_gpu_from_its_own_start(tmp_path, exporter):
    """A second run from the web UI gets its own GPU readings (it once said "first run only"): each report's
    timeline covers its own run, from its own start."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx
    from conftest import wait_until
    from locust_tools import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "locust", "-f", "locustfile.py", "--web-host", "127.0.0.1", "--web-port", str(port),
           "--sim-args", "--step-base-ms 5", "--stopstorm-report", str(tmp_path / "report.json"),
           "--dcgm-url", f"{exporter}/metrics", "--gpu-interval", "0.2", "--max-tokens", "20"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith(("STOPSTORM_", "LOCUST_"))})
    ui = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{ui}/", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(answers, timeout=60, interval=0.2, what="the web UI")
        for n in (1, 2):
            form = {"user_count": "2", "spawn_rate": "2", "run_time": "2s"}
            assert httpx.post(f"{ui}/swarm", data=form, timeout=10).json()["success"]
            wait_until((tmp_path / f"report-run{n}.json").exists, timeout=60, interval=0.1, what=f"run {n}'s report")
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    docs = [json.loads((tmp_path / f"report-run{n}.json").read_text()) for n in (1, 2)]
    for n, doc in enumerate(docs, 1):
        assert "gpu" in doc and doc["meta"].get("gpu") is None, (n, doc["meta"].get("gpu"), output[-2000:])
        rows = doc["gpu"]["timeline"]["rows"]
        assert len(rows) >= 5 and rows[0][0] < 0.5 and rows[-1][0] <= doc["meta"]["duration_s"] + 1.0, (n, rows)


def test_the_sampler_runs_on_the_master_unless_a_worker_sits_on_the_gpu_host():
    """Run in a fresh interpreter: importing Locust here, after ssl, would monkey-patch too late."""
    import subprocess
    import sys

    script = """
import locust  # first: gevent's monkey patching
from types import SimpleNamespace
from locust.runners import LocalRunner, MasterRunner, WorkerRunner
from stopstorm.metrics.plugin import gpu as gpu_hooks, options

def choose(runner_cls, **opts):
    base = dict(no_gpu=False, gpu_indices="", gpu_interval=0.1, gpu_idle_pct=5.0, dcgm_url="", gpu_host_worker=False)
    base.update(opts)
    env = SimpleNamespace(parsed_options=SimpleNamespace(**base), runner=object.__new__(runner_cls))
    gpu_hooks._choose_where_to_sample(env)
    return bool(gpu_hooks._gpu.sample)

print(choose(LocalRunner), choose(MasterRunner), choose(WorkerRunner),
      choose(MasterRunner, gpu_host_worker=True), choose(WorkerRunner, gpu_host_worker=True),
      choose(LocalRunner, no_gpu=True))
bad = dict(no_gpu=False, gpu_indices="0,x", gpu_interval=0.1, gpu_idle_pct=5.0, dcgm_url="", gpu_host_worker=False)
try:
    options.check_options(SimpleNamespace(**bad))  # the plugin's check at init, before anything starts
except ValueError as exc:
    print("refused", exc)
"""
    root = ROOT
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "True True False False True False"
    assert lines[1].startswith("refused --gpu-indices wants GPU numbers"), out.stdout


def test_streams_before_the_stop_or_after_the_drop_do_not_block_the_measure():
    clock = FakeClock(T0 - 0.5)
    s = run_sampler(StandinNvml([step_gpu()], wall=clock.wall, driver_rate_s=DRIVER_RATE_S), clock, 3.0)
    stop = T0 + BUSY_S - 0.05 - MONO_OFFSET
    recs = [record(stop - 0.5, stop, stop + 0.001),
            record(stop - 0.9, None, stop - 0.2, "finished-before"),  # ended before the Stop
            record(stop + 0.5, None, stop + 0.9, "sent-after-drop")]  # sent once the GPU was idle again
    g = attribute(s.samples, s.util_samples, T0 - 0.5 - MONO_OFFSET, T0 + 2.5 - MONO_OFFSET, recs,
                  delivered_tokens=1, wasted_tokens=0, source="NVML", tokens_source="simulator ledger")
    assert g.idle_stops.value == 1
    recs.append(record(stop - 0.1, None, stop + 0.02, "overlaps"))  # still in flight just after the Stop
    g = attribute(s.samples, s.util_samples, T0 - 0.5 - MONO_OFFSET, T0 + 2.5 - MONO_OFFSET, recs,
                  delivered_tokens=1, wasted_tokens=0, source="NVML", tokens_source="simulator ledger")
    assert g.idle_stops.value == 0


@pytest.mark.slow
def test_distributed_run_samples_on_the_gpu_host_worker_only(tmp_path, exporter):
    """Master + one worker, both told the worker sits on the GPU host: the worker reads the exporter and writes
    its timeline; the master does not sample and says where it went."""
    import json
    import socket
    import subprocess
    import sys

    root = ROOT
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    report = tmp_path / "report.json"
    gpu = ["--dcgm-url", f"{exporter}/metrics", "--gpu-host-worker"]
    master = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", "locustfile.py", "--master", "--headless", "--expect-workers", "1",
         "-u", "2", "-r", "2", "-t", "2s", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
         "--sim-args", "--step-base-ms 5", "--stopstorm-report", str(report), "--only-summary", *gpu],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        worker = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "locustfile.py", "--worker", "--master-host", "127.0.0.1",
             "--master-port", str(port), *gpu], cwd=root, capture_output=True, text=True, timeout=60)
        master_out, _ = master.communicate(timeout=60)
    finally:
        if master.poll() is None:
            master.kill()
    worker_out = worker.stdout + worker.stderr
    assert master.returncode == 0, master_out[-3000:]
    assert "sampling GPU 0" in worker_out and "sampling GPU" not in master_out
    assert "GPU: sampled by the worker on the GPU host" in master_out
    assert json.loads(report.read_text())["meta"]["gpu"]["off"].startswith("sampled by the worker")
    rows = (tmp_path / "report-gpu-timeline-worker.csv").read_text().splitlines()
    assert rows[0].startswith("t_s,gpu,util_pct") and len(rows) > 5

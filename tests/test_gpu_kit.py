"""The offline GPU kit (scripts/gpu_kit.py), as far as a machine without a GPU can check it.

Fast: argument errors and the no-GPU exit (one line, non-zero, no traceback), the plan over a small dependency
graph, wheel tags, the requirement check, the folder check, the one-page summary over report documents.
Slow (network): a real `download` for CPython 3.12, and a real `run --dry-run` from a stand-in of the GPU image
(a venv holding only the image's packages, some deliberately older than the kit needs, so spares get used).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.gpu_kit import (
    IMAGE,
    MANIFEST,
    Node,
    check_requirements,
    checkout_packages,
    marker_env,
    plan_kit,
    summary_page,
    target_tags,
    verify_kit,
    wheel_fits,
)

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / "scripts" / "gpu_kit.py"
HERE = f"{sys.version_info.major}.{sys.version_info.minor}"


def kit(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(KIT), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def empty_kit(folder: Path, python_version: str = HERE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps({"kit_schema": 1, "python_version": python_version, "glibc": [2, 28],
                                               "wheels": [], "spares": [], "excluded": []}))
    return folder


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpu_kit: ")
    return lines[0]


# --- the command line: errors ---------------------------------------------------------------------------------


def test_no_subcommand_is_a_usage_error():
    proc = kit()
    assert proc.returncode == 2 and "usage:" in proc.stderr and "Traceback" not in proc.stderr


def test_run_without_a_kit_folder_says_what_to_do(tmp_path):
    proc = kit("run", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "is not a folder" in line and "gpu_kit.py download" in line
    assert not (tmp_path / "out").exists()


def test_run_on_a_folder_without_a_manifest(tmp_path):
    (tmp_path / "wheels").mkdir()
    proc = kit("run", str(tmp_path / "wheels"), str(tmp_path / "out"))
    assert proc.returncode == 2 and "kit-manifest.json cannot be read" in one_line_error(proc)


def test_download_into_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    proc = kit("download", str(tmp_path / "f"))
    assert proc.returncode == 2 and "is not a folder" in one_line_error(proc)


@pytest.mark.skipif(HERE == "3.12", reason="here the 3.12 kit is this interpreter's")
def test_a_real_run_of_a_312_kit_on_another_python_points_to_the_dry_run(tmp_path):
    proc = kit("run", str(empty_kit(tmp_path / "w", "3.12")), str(tmp_path / "out"))
    assert proc.returncode == 2 and "use `run --dry-run` here" in one_line_error(proc)


def _env_without_torch(extra_path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return env


def test_no_torch_is_one_line_and_exit_3(tmp_path):
    try:
        import torch  # noqa: F401
        pytest.skip("torch is importable here")
    except ImportError:
        pass
    proc = kit("run", str(empty_kit(tmp_path / "w")), str(tmp_path / "out"), env=_env_without_torch())
    assert proc.returncode == 3
    line = one_line_error(proc)
    assert "no GPU to check here: torch is not importable" in line and "--dry-run" in line
    assert not (tmp_path / "out").exists()  # nothing written before the GPU is known to be there


def test_torch_without_cuda_is_one_line_and_exit_3(tmp_path):
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "__version__ = '2.9.0+cpu'\n"
        "class version:\n    cuda = None\n"
        "class cuda:\n    @staticmethod\n    def is_available():\n        return False\n")
    proc = kit("run", str(empty_kit(tmp_path / "w")), str(tmp_path / "out"), env=_env_without_torch(fake.parent))
    assert proc.returncode == 3
    assert "torch 2.9.0+cpu sees no CUDA device (built for CUDA None)" in one_line_error(proc)


# --- the plan ---------------------------------------------------------------------------------------------------


def graph() -> dict[str, Node]:
    nodes = [
        Node("locust", "2.47.0", ["gevent>=24", "flask>=2", "requests>=2.33.1",
                                  "typing-extensions>=4.6; python_version < '3.12'",
                                  "pywin32; sys_platform == 'win32'"]),
        Node("gevent", "26.9.0", ["greenlet>=3"]),
        Node("greenlet", "3.5.6", []),
        Node("flask", "3.1.3", ["werkzeug>=3.1", "jinja2>=3.1.2"]),
        Node("jinja2", "3.1.6", ["markupsafe>=2.0"]),
        Node("werkzeug", "3.1.9", ["markupsafe>=2.1.1"]),
        Node("markupsafe", "3.0.4", []),
        Node("requests", "2.34.2", ["idna<4"]),
        Node("idna", "3.20", []),
        Node("uvicorn", "0.55.0", ["h11>=0.8", "uvloop>=0.15.1; extra == 'standard'",
                                   "httptools>=0.6; extra == 'standard'"]),
        Node("h11", "0.16.0", []),
        Node("uvloop", "0.23.0", []),
        Node("httptools", "0.9.0", []),
        Node("typing-extensions", "4.16.0", []),
        Node("matplotlib", "3.11.2", ["numpy>=1.25"]),
        Node("numpy", "2.4.6", []),
    ]
    return {n.name: n for n in nodes}


def test_plan_carries_what_the_image_lacks_and_says_why_it_left_the_rest():
    plan = plan_kit(graph(), ["locust>=2.30", "uvicorn[standard]>=0.29", "matplotlib>=3.8", "requests>=2.31"],
                    ["requests", "werkzeug", "uvloop", "matplotlib"], "3.12")
    assert plan.missing == []
    assert set(plan.wheels) == {"locust", "gevent", "greenlet", "flask", "jinja2", "uvicorn", "h11", "httptools"}
    assert plan.wheels["locust"] == "stopstorm needs it" and plan.wheels["greenlet"] == "gevent needs it"
    assert plan.excluded == {"requests": "in the image", "werkzeug": "in the image", "uvloop": "in the image",
                             "matplotlib": "in the image", "idna": "brought by requests (in the image)",
                             "markupsafe": "brought by werkzeug (in the image)",
                             "numpy": "brought by matplotlib (in the image)"}
    # typing-extensions only for Python < 3.12, pywin32 only on Windows: neither is needed on the 3.12 host
    assert "typing-extensions" not in plan.wheels and "pywin32" not in plan.wheels
    # spares: image packages the kit needs (uvloop through uvicorn's extra), with what they in turn need;
    # never the numeric stack
    assert set(plan.spares) == {"requests", "idna", "werkzeug", "markupsafe", "uvloop"}
    assert "locust needs >=2.33.1" in plan.spares["requests"] and "stopstorm needs >=2.31" in plan.spares["requests"]
    assert plan.spares["idna"] == "requests (a spare) needs <4"


def test_plan_for_311_follows_the_311_markers():
    plan = plan_kit(graph(), ["locust>=2.30"], ["requests"], "3.11")
    assert plan.wheels["typing-extensions"] == "locust needs it"


def test_plan_names_what_the_resolution_lacks():
    nodes = graph()
    del nodes["greenlet"]
    plan = plan_kit(nodes, ["locust"], [], "3.12")
    assert plan.missing == ["greenlet (needed by gevent)"]


# --- tags, requirements, the folder ---------------------------------------------------------------------------


def test_wheel_tags_for_the_312_manylinux_host():
    tags = target_tags("3.12")
    assert wheel_fits("gevent-26.9.0-cp312-cp312-manylinux_2_28_x86_64.whl", tags)
    assert wheel_fits("psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.whl", tags)
    assert wheel_fits("orjson-3.13.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", tags)
    assert wheel_fits("locust-2.47.0-py3-none-any.whl", tags)
    assert not wheel_fits("gevent-26.9.0-cp311-cp311-manylinux_2_28_x86_64.whl", tags)
    assert not wheel_fits("gevent-26.9.0-cp312-cp312-manylinux_2_34_x86_64.whl", tags)  # newer glibc than 2.28
    assert not wheel_fits("gevent-26.9.0-cp312-cp312-macosx_11_0_arm64.whl", tags)
    assert not wheel_fits("not-a-wheel.tar.gz", tags)


def test_requirement_check_finds_what_is_missing_or_too_old():
    env = marker_env("3.12")
    wanted = [("anyio>=4.10", "openai"), ("typing-extensions>=4.16", "pydantic"), ("brotli", "geventhttpclient"),
              ("exceptiongroup; python_version < '3.11'", "anyio"), ("requests>=2.31", "stopstorm")]
    unmet = check_requirements(wanted, {"anyio": "4.4.0", "typing-extensions": "4.16.0", "requests": "2.34.2"}, env)
    assert unmet == [{"name": "anyio", "need": "anyio>=4.10", "by": "openai", "have": "4.4.0"},
                     {"name": "brotli", "need": "brotli", "by": "geventhttpclient", "have": None}]


def test_folder_check_catches_a_damaged_or_foreign_wheel(tmp_path):
    good = tmp_path / "locust-2.47.0-py3-none-any.whl"
    good.write_bytes(b"wheel")
    foreign = tmp_path / "gevent-26.9.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    foreign.write_bytes(b"x")
    def entry(p: Path, sha: str | None = None) -> dict:
        return {"name": p.name.split("-")[0], "file": p.name,
                "sha256": sha or hashlib.sha256(p.read_bytes()).hexdigest()}

    manifest = {"wheels": [entry(good), entry(foreign)], "spares": [entry(good, "0" * 64) | {"file": "gone.whl"}]}
    problems = verify_kit(tmp_path, manifest, target_tags("3.12"))
    assert problems == [f"{foreign.name} does not install on this target",
                        f"{tmp_path / 'spare' / 'gone.whl'} is missing"]
    manifest["wheels"][0]["sha256"] = "0" * 64
    assert "does not match its sha256" in verify_kit(tmp_path, manifest, target_tags("3.12"))[0]


def test_checkout_packages_follow_pyproject(tmp_path):
    names, aliases = checkout_packages(ROOT)
    assert names == ["stopstorm"] and aliases == {}  # one import name; its checkout folder links the others
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = []\n[tool.setuptools]\n'
                                             'packages = ["stopstorm", "stopstorm.metrics"]\n'
                                             'package-dir = {"stopstorm" = "."}\n')
    names, aliases = checkout_packages(tmp_path)
    assert names == ["stopstorm"] and aliases == {"stopstorm": tmp_path.resolve()}


# --- the summary ------------------------------------------------------------------------------------------------


def fig(value, unit="J", source="NVML + simulator ledger", note=None) -> dict:
    out = {"value": value, "unit": unit, "source": source}
    if note:
        out["note"] = note
    return out


def dist(p50: float, mx: float, n: int = 3) -> dict:
    return {"count": n, "p50": p50, "p90": mx, "p95": mx, "p99": mx, "max": mx, "mean": p50}


def report(streams: int, cells: list[tuple[str, str, float | None]], with_gpu: bool = True) -> dict:
    doc: dict = {"schema_version": 2, "meta": {"partial": False},
                 "cells": [{"stack": s, "close_mode": m, "figures": {"abort_latency": fig(dist(0.015, 0.016), "s")}}
                           for s, m, _ in cells],
                 "overall": {"figures": {"streams": fig(streams, "streams"), "stopped": fig(streams, "streams"),
                                         "aborted": fig(streams - 1, "streams"), "goodput_tokens": fig(400, "tokens"),
                                         "wasted_tokens": fig(100, "tokens")}},
                 "run": {"figures": {"duration": fig(61.2, "s")}}}
    if not with_gpu:
        doc["meta"]["gpu"] = {"off": "NVML could not start: NVML Shared Library Not Found"}
        return doc
    doc["gpu"] = {"source": "nvml", "devices": [{"index": 0, "name": "NVIDIA H200", "uuid": "GPU-1"}],
                  "interval_s": 0.1, "idle_pct": 5.0, "errors": 0, "last_error": None,
                  "energy": fig(5000.0), "mean_power": fig(81.7, "W"), "gpu_busy_seconds": fig(40.5, "GPU-s"),
                  "energy_per_delivered_token": fig(12.5, "J/token"), "wasted_gpu_seconds": fig(8.1, "GPU-s"),
                  "wasted_energy": fig(1000.0), "idle_stops": fig(3, "stops"),
                  "stop_to_idle": fig(dist(0.112, 0.2), "s", note="driver samples"),
                  "wasted_gpu_seconds_x": fig(None, "GPU-s", "unavailable", note="needs wasted tokens"),
                  "cells": [{"stack": s, "close_mode": m, "wasted_gpu_seconds": fig(1.0, "GPU-s"),
                             "wasted_energy": fig(120.0), "idle_stops": fig(1 if v is not None else 0, "stops"),
                             "stop_to_idle": fig(dist(v, v, 1) if v is not None else None, "s")}
                            for s, m, v in cells]}
    return doc


def test_summary_puts_stop_to_idle_per_cell_and_energy_per_token_on_one_page():
    probe = report(18, [("requests", "close", 0.031), ("requests", "hold", 5.02), ("openai", "drop", None)])
    load = report(120, [("httpx", "close", None)])
    record = {"dry_run": False, "python": "3.12.3", "checkout": "abc123", "gpu": {"torch": "2.6.0", "cuda": "12.4"},
              "versions": {"locust": "2.47.0", "nvidia driver": "560.35"}, "probe_streams": 18,
              "steps": [{"step": "the probe with --gpu-work", "seconds": 231.0}], "files": ["probe-report.json"],
              "probe_verdict": ["openai SDK, sync and async: `drop` never closes the stream — call `close()`"]}
    page = summary_page(probe, load, record)
    # the probe's own verdict (probe.json), in words, under its own heading
    assert "## The probe's verdict\n\n- openai SDK, sync and async: `drop` never closes the stream" in page
    assert "NVIDIA H200" in page and "driver 560.35" in page and "torch 2.6.0, CUDA 12.4" in page
    assert "| probe | requests | close | 15 | 1 | 31 | 31 | 120.0 | 1.00 |" in page
    assert "| probe | requests | hold | 15 | 1 | 5,020 | 5,020 |" in page
    assert "| probe | openai | drop | 15 | 0 | – | – |" in page
    assert "| load | httpx | close |" in page
    assert "| energy per delivered token J | 12.5000 | 12.5000 |" in page
    assert "| wasted energy J | 1,000.0 | 1,000.0 |" in page
    assert "| Stop → GPU idle p50 / max ms | 112 / 200 (3 stops) |" in page
    assert "- probe, no value for wasted gpu seconds x: needs wasted tokens" in page
    assert "driver samples" not in page and "not in its report" not in page
    assert len(page.splitlines()) < 60  # one page


def test_summary_says_why_figures_are_missing():
    record = {"dry_run": True, "python": "3.11.7", "gpu": {"error": "torch is not importable (x)"}, "probe_streams": 2}
    probe = report(0, [], with_gpu=False)
    page = summary_page(probe, None, record)
    assert "(dry run" in page and "GPU: torch is not importable (x)" in page
    assert "- probe: no GPU figures (NVML could not start: NVML Shared Library Not Found)" in page
    assert "- load: no report" in page
    assert "its 2 streams are in probe.json but not in its report" in page


# --- slow: the real thing, with the network ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def kit312(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("kit") / "wheels"
    proc = kit("download", str(dest), timeout=900)
    assert proc.returncode == 0, proc.stderr
    return dest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_download_resolves_every_wheel_for_312(kit312):
    m = json.loads((kit312 / MANIFEST).read_text())
    names = {w["name"] for w in m["wheels"]}
    assert {"locust", "gevent", "geventhttpclient", "openai", "fastapi", "starlette", "uvicorn", "orjson",
            "flask"} <= names
    excluded = {e["name"]: e["why"] for e in m["excluded"]}
    assert all(excluded[n] == "in the image" for n in IMAGE)
    assert not names & set(excluded)
    tags = target_tags("3.12")
    assert all(wheel_fits(w["file"], tags) for w in m["wheels"] + m["spares"])
    assert verify_kit(kit312, m, tags) == []
    on_disk = sum(p.stat().st_size for p in kit312.rglob("*.whl"))
    assert on_disk == m["sizes"]["total_bytes"] < 48 * 2**20


@pytest.fixture(scope="module")
def local_kit(kit312, tmp_path_factory) -> Path:
    """The same versions as kit312, built for this Python."""
    local = tmp_path_factory.mktemp("local") / "wheels"
    proc = kit("download", str(local), "--python-version", HERE, "--same-as", str(kit312), timeout=900)
    assert proc.returncode == 0, proc.stderr
    return local


@pytest.fixture(scope="module")
def image_python(tmp_path_factory) -> str:
    """A stand-in for the GPU image: a venv with only its packages, anyio, typing-extensions and requests older
    than the kit needs (so the spares are used). torch is not there: the stand-in below plays it."""
    image = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(image)], check=True, timeout=300)
    py = str(image / "bin" / "python")
    pkgs = [n for n in IMAGE if n not in ("httpx", "requests")]
    subprocess.run([py, "-m", "pip", "install", "-q", *pkgs, "httpx==0.27.2", "requests==2.32.3", "anyio==4.4.0",
                    "typing_extensions==4.12.2"], check=True, timeout=900, capture_output=True)
    return py


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_dry_run_from_a_standin_of_the_image(kit312, local_kit, image_python, tmp_path):
    """The 3.12 kit checked and unpacked, the same versions for this Python installed, spares filling the image's
    gaps, every module imported, the short runs' reports and the summary written."""
    out = tmp_path / "out"
    proc = subprocess.run([image_python, str(KIT), "run", "--dry-run", str(kit312), str(out), "--local-wheels",
                           str(local_kit)], capture_output=True, text=True, cwd=ROOT, env=_env_without_torch(),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "falls short of" in proc.stdout and "installing the spare" in proc.stdout
    assert "modules import" in proc.stdout and "not proven by this run:" in proc.stdout
    record = json.loads((out / "kit-run.json").read_text())
    assert {"anyio", "typing-extensions", "requests"} <= set(record["spares_installed"])
    assert [r["exit"] for r in record["runs"].values()] == [0, 0]
    load = json.loads((out / "load-report.json").read_text())
    assert load["overall"]["figures"]["streams"]["value"] > 0
    assert (out / "summary.md").read_text().startswith("# stopstorm GPU check (dry run")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_real_path_end_to_end_with_standins_for_torch_and_nvml(local_kit, image_python, tmp_path):
    """`run` itself (not a dry run), with the kit for this Python and tests/gpu_kit_standins/ playing torch with
    CUDA and NVML over one virtual GPU: the full probe and the 60 s load run with --gpu-work, both reports with
    a gpu section and their timelines, the summary, inside the 8-minute budget. About 5.5 minutes."""
    out = tmp_path / "out"
    env = _env_without_torch(ROOT / "tests" / "gpu_kit_standins")
    env["STANDIN_GPU_STATE"] = str(tmp_path / "gpu-state.json")
    proc = subprocess.run([image_python, str(KIT), "run", str(local_kit), str(out)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    record = json.loads((out / "kit-run.json").read_text())
    assert record["seconds"] < 480 and [r["exit"] for r in record["runs"].values()] == [0, 0]
    for name in ("probe", "load"):
        doc = json.loads((out / f"{name}-report.json").read_text())
        assert doc["gpu"]["devices"][0]["name"] == "Stand-in GPU (CPU rehearsal)"
        assert doc["gpu"]["energy"]["value"] > 0
        for tag in ("gpu-timeline.csv", "gpu-timeline.png", "gpu-stops.csv"):
            assert (out / f"{name}-report-{tag}").is_file()
    load = json.loads((out / "load-report.json").read_text())
    assert load["gpu"]["energy_per_delivered_token"]["value"] > 0
    page = (out / "summary.md").read_text()
    assert "| energy per delivered token J |" in page and "| load |" in page

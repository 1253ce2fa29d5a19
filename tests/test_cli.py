"""The `stopstorm` command and the wheel: one import name, the locustfiles shipped, a run from an empty folder.

The wheel test builds the wheel as a user's `pip install .` would, installs it into a folder of its own and runs
it from an empty directory with that folder first on the path, so nothing of the checkout can stand in for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_help_lists_locusts_and_stopstorms_options_grouped(tmp_path: Path) -> None:
    out = _run(["-m", "stopstorm", "--help"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    ours = ("--stop-probability", "--close-mix", "--stopstorm-report", "--sim-max-num-seqs", "--gpu-interval",
            "--max-loop-lag-ms", "--records-interval", "--arrival-rate")
    for flag in (*ours, "--users", "--run-time"):  # and two of Locust's own
        assert flag in text, flag
    groups = [line.rstrip(":") for line in text.splitlines() if line.startswith("stopstorm ") and line.endswith(":")]
    assert groups == ["stopstorm streams", "stopstorm load shapes", "stopstorm report", "stopstorm server truth",
                      "stopstorm embedded simulator", "stopstorm GPU", "stopstorm self-monitoring",
                      "stopstorm master/worker"], groups
    probe = _run(["-m", "stopstorm", "probe", "--help"], cwd=tmp_path)  # the probe's locustfile adds its own
    assert probe.returncode == 0 and "--probe-stacks" in probe.stdout and "--stop-probability" in probe.stdout


def test_a_command_line_value_that_starts_with_a_dash_reaches_its_option() -> None:
    from stopstorm.cli import _join_option_values

    assert _join_option_values(["--headless", "--sim-args", "--gpu-work", "-u", "2"]) == [
        "--headless", "--sim-args=--gpu-work", "-u", "2"]
    assert _join_option_values(["--sim-args", "--step-base-ms 5"]) == ["--sim-args=--step-base-ms 5"]
    assert _join_option_values(["--sim-args", "x"]) == ["--sim-args", "x"]  # argparse reads that one itself


def test_a_tool_subcommand_has_its_own_help(tmp_path: Path) -> None:
    out = _run(["-m", "stopstorm", "compare", "--help"], cwd=tmp_path)
    assert out.returncode == 0 and "stopstorm compare" in out.stdout


@pytest.mark.slow
def test_the_wheel_installs_one_name_and_runs_from_an_empty_folder(tmp_path: Path) -> None:
    dist, target, empty = tmp_path / "dist", tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    built = _run(["-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)], cwd=tmp_path, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("stopstorm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"stopstorm"}
    for shipped in ("stopstorm/locustfile.py", "stopstorm/probe.py", "stopstorm/capacity.py", "stopstorm/cli.py",
                    "stopstorm/users/core.py", "stopstorm/metrics/plugin/hooks.py", "stopstorm/simulator/engine.py"):
        assert shipped in names, shipped
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "stopstorm = stopstorm.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    installed = _run(["-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], cwd=tmp_path,
                     timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = _run(["-c", "import stopstorm.users.core as m; print(m.__file__)"], cwd=empty, env=env)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    run = _run(["-m", "stopstorm", "--headless", "-u", "2", "-r", "2", "-t", "4s", "--max-tokens", "40",
                "RequestsUser", "HttpxUser"], cwd=empty, env=env, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((empty / "stopstorm-report.json").read_text())
    assert report["meta"]["host"].startswith("http://127.0.0.1:")  # the embedded simulator, shipped in the wheel
    assert "simulator ledger" in report["sources"]
    assert (empty / "stopstorm-report.html").exists()

"""The README's first command, as a first-time user runs it: every client stack takes part, and the output says
which ran, leads with the verdict and the summary block, and keeps Locust's own tables readable."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

STACKS = ("fasthttp", "httpx", "httpx-async", "openai", "openai-async", "requests")


def test_the_readme_s_first_command_runs_all_six_stacks_and_says_so(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"stopstorm --headless -u 6 -r 6 -t \d+s", readme)
    assert command, "the README's first command changed: update this test"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STOPSTORM_", "LOCUST_"))}
    # The README's command, shorter (-t 8s): what matters here is who takes part, not the figures
    proc = subprocess.run([sys.executable, "-m", "stopstorm", "--headless", "-u", "6", "-r", "6", "-t", "8s"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # Locust gives 6 users over 6 classes of equal weight one each
    spawned = json.loads(re.search(r"All users spawned: (\{.*?\})", out).group(1))  # type: ignore[union-attr]
    assert sorted(spawned.values()) == [1] * 6, spawned
    # …and the output names the stacks that ran
    assert f"client stacks:          6 of 6 ran: {', '.join(STACKS)}" in out, out[-4000:]
    assert out.index("stopstorm verdict") < out.index("stopstorm summary") < out.index("stopstorm abort accounting")
    doc = json.loads((tmp_path / "stopstorm-report.json").read_text())
    assert doc["summary"]["stacks"] == list(STACKS) == doc["summary"]["planned_stacks"]
    assert {c["stack"] for c in doc["cells"]} == set(STACKS)
    # Locust's tables: one 'stream' row per stack and outcome, aligned (the Type column holds 8 characters)
    rows = [line for line in out.splitlines() if line.startswith("stream   ")]
    assert rows and all(line[9:].split()[0] in STACKS for line in rows)
    assert all(line.index("|") == rows[0].index("|") for line in rows if "|" in line)  # the columns line up
    assert not [line for line in out.splitlines() if re.match(r"^\S+\s+ttft\s", line)]  # no TTFT rows

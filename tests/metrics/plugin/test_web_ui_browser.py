"""Locust's web UI as a person sees it, in headless Chromium: every stopstorm option in the start form, and a
run's Stops tab with its live chart, totals and zombie column (tests/browser_tools.py drives Chromium).

One real `locust -f locustfile.py` process with its web UI (the embedded simulator behind it), a short run
started through the UI's own /swarm, looked at while it runs, then stopped by PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from browser_tools import colour_counts, dump_dom, keep_screenshot, need_chromium, screenshot, seen
from conftest import ROOT
from locust_tools import free_port

from stopstorm.metrics.plugin.web_stops import SIZE_COLUMN

pytestmark = pytest.mark.slow

# The options a locustfile run registers, as the shipped locustfile's own process sees them (not this test
# process's, which may have imported the probe's or the capacity search's tables too).
_EXPECTED = """
import json, stopstorm.locustfile
from stopstorm.metrics.plugin import options
print(json.dumps([[o.dest, o.in_web_ui] for t in options.tables() for o in t]))
"""


def _camel(dest: str) -> str:
    head, *rest = dest.split("_")
    return head + "".join(p.title() for p in rest)


def _template_args(page: str) -> dict[str, Any]:
    m = re.search(r"window\.templateArgs = (\{.*?\})\n", page, re.S)
    assert m, page[:2000]
    return json.loads(m.group(1))


def _wait(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise AssertionError(f"{url} did not answer within {timeout:g} s")


@pytest.fixture(scope="module")
def web_ui(tmp_path_factory: pytest.TempPathFactory):
    need_chromium()
    out = tmp_path_factory.mktemp("webui")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STOPSTORM_", "LOCUST_"))}
    log = (out / "locust.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "locust", "-f", "locustfile.py", "--web-host", "127.0.0.1",
                             "--web-port", str(port), "--sim-args", "--step-base-ms 8", "--think-time", "0.2",
                             "--stop-probability", "0.7", "--hold-seconds", "1", "--no-gpu",
                             "--stopstorm-report", str(out / "r.json")],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{url}/")
        yield url, out
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # Locust's own shutdown: the report, then the simulator stops
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


def test_the_start_form_lists_every_stopstorm_option(web_ui) -> None:
    url, out = web_ui
    listed = json.loads(subprocess.run([sys.executable, "-c", _EXPECTED], cwd=ROOT, capture_output=True, text=True,
                                       check=True, timeout=60).stdout)
    shown = {dest for dest, in_ui in listed if in_ui}
    hidden = {dest for dest, in_ui in listed if not in_ui}
    assert len(shown) > 30 and hidden == {"server_log_cmd"}  # a shell command never comes from a browser
    assert "fail_on" in shown  # a threshold is judged on a web-UI run's report as on a headless one
    # The page's own template arguments: what Locust's React form is built from
    extra = _template_args(requests.get(f"{url}/", timeout=10).text)["extra_options"]
    assert shown <= set(extra), sorted(shown - set(extra))
    assert not hidden & set(extra)
    # …and the form the browser built from them: one field per option, in "Custom parameters"
    dom = dump_dom(f"{url}/", wait_ms=3000)
    assert "Custom parameters" in dom
    fields = set(re.findall(r'name="([A-Za-z_]+)"', dom))
    missing = sorted(d for d in shown if _camel(d) not in fields and d not in fields)
    assert not missing, f"options missing from the start form: {missing}"
    shot = screenshot(f"{url}/", out / "form.png", (1200, 900), wait_ms=3000)
    assert sum(n for px, n in colour_counts(shot).items() if px != (255, 255, 255)) > 20_000  # the form drew
    keep_screenshot(shot, "web-ui-form.png")


def test_a_bad_value_in_the_start_form_is_refused_before_anything_starts(web_ui) -> None:
    """The form's values meet the command line's rules: a bad one is answered as Locust answers a bad spawn rate
    (success false, a message naming the option), and no user starts; a good threshold passes."""
    url, _ = web_ui
    host = _template_args(requests.get(f"{url}/", timeout=10).text)["host"]
    for field, value in (("read_timeout", "0"), ("max_tokens", "many"), ("fail_on", "zombies>>1"),
                         ("close_mix", "close:nan"), ("stopstorm_report", "/nonexistent-dir/r.json")):
        answer = requests.post(f"{url}/swarm", data={"user_count": 2, "spawn_rate": 2, "host": host, field: value},
                               timeout=10).json()
        flag = "--" + field.replace("_", "-")
        assert answer["success"] is False and flag in answer["message"], (field, answer)
        assert answer["message"].startswith("stopstorm: ") and "Traceback" not in answer["message"]
        state = requests.get(f"{url}/stats/requests", timeout=10).json()
        assert state["state"] == "ready" and state["user_count"] == 0, (field, state["state"])


# The live chart's colours (web_stops._COLOURS) as the screenshot shows them
_CHART = {"running": (0x1F, 0x77, 0xB4), "waiting": (0xFF, 0x7F, 0x0E), "delivered tok/s": (0x17, 0xBE, 0xCF)}


def test_a_run_s_stops_tab_shows_the_live_chart_totals_and_zombies(web_ui) -> None:
    url, out = web_ui
    args = _template_args(requests.get(f"{url}/", timeout=10).text)
    started = requests.post(f"{url}/swarm", data={"user_count": 6, "spawn_rate": 6, "host": args["host"]},
                            timeout=10).json()
    assert started["success"], started
    try:
        deadline = time.monotonic() + 40
        stops: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            body = requests.get(f"{url}/stats/requests", timeout=10).json()
            stops = next(s for s in body["extended_stats"] if s["key"] == "stops")["data"]
            if len(stops) >= 3:
                break
            time.sleep(1)
        assert len(stops) >= 3, "no stopped stream reached the Stops tab"
        assert stops[0]["stack"] == "all" and "stopped" in stops[0]["request"]  # the totals row leads
        assert all("zombie_s" in row for row in stops)
        names = {s["name"] for s in body["stats"]}
        assert any(n.endswith((" stop", " not stopped")) for n in names) and "ttft" not in names, names
        assert {s["method"] for s in body["stats"] if s["name"] != "Aggregated"} <= {"stream"}
        shot = screenshot(f"{url}/?tab=stops", out / "stops.png", (1400, 1100), wait_ms=6000)
        chart = colour_counts(shot, (0, 100, 1400, 500))  # the chart above the table
        missing = [name for name, rgb in _CHART.items() if seen(chart, rgb, tol=20) < 30]
        assert not missing, f"the live chart lacks: {missing}"
        keep_screenshot(shot, "web-ui-stops.png")
        dom = dump_dom(f"{url}/?tab=stops", wait_ms=6000)
        assert 'id="stopstorm-live"' in dom and "Zombie slot-s" in dom and "stopped," in dom
        stats = dump_dom(f"{url}/", wait_ms=6000)  # the Statistics tab: its size column says what it holds
        headers = re.findall(r"<th[^>]*>(.*?)</th>", stats)
        assert SIZE_COLUMN[1] in headers and SIZE_COLUMN[0] not in headers, headers
    finally:
        requests.get(f"{url}/stop", timeout=10)
    # The live page and its SVG answer; the report links answer once a run's report is written
    live = requests.get(f"{url}/stopstorm/live", timeout=30)
    assert live.status_code == 200 and "<svg" in live.text
    shot = screenshot(f"{url}/stopstorm/live", out / "live.png", (1000, 700))
    counts = colour_counts(shot)
    missing = [name for name, rgb in _CHART.items() if seen(counts, rgb, tol=20) < 30]
    assert not missing, f"the live page's chart lacks: {missing}"
    keep_screenshot(shot, "web-ui-live.png")
    assert requests.get(f"{url}/stopstorm/report.json", timeout=30).status_code in (200, 404)
    assert Path(out).is_dir()

"""The docs stay true to the code and to their data: the generated pages are current, every relative link
points at a file that exists, the benchmark tables match benchmarks/results/, and every figure there says
where it came from.

The generators run in their own processes, as a contributor runs them (scripts/gen_docs.py imports the shipped
locustfiles, which register listeners on Locust's global events: kept out of the test process).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "CONTRIBUTING.md", *DOCS.rglob("*.md")])
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def _check(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, script, "--check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


def test_the_options_reference_and_the_generated_blocks_are_current() -> None:
    out = _check("scripts/gen_docs.py")
    assert out.returncode == 0, f"run `python scripts/gen_docs.py`:\n{out.stdout[-3000:]}{out.stderr[-2000:]}"
    text = (DOCS / "reference" / "options.md").read_text(encoding="utf-8")
    for flag in ("--stop-probability", "--close-mix", "--sim-max-num-seqs", "--probe-stacks", "--capacity-json"):
        assert f"`{flag}`" in text, flag


def test_the_benchmark_tables_match_their_data() -> None:
    out = _check("benchmarks/render_tables.py")
    assert out.returncode == 0, f"run `python benchmarks/render_tables.py`:\n{out.stdout}{out.stderr}"


def test_every_results_block_on_a_page_has_data_and_every_table_is_shown() -> None:
    shown = {m for page in [*(DOCS / "benchmarks").glob("*.md"), *(DOCS / "guides").glob("*.md")]
             for m in re.findall(r"<!-- results: ([\w-]+/[\w-]+) -->", page.read_text(encoding="utf-8"))}
    tables = set()
    for path in RESULTS:
        doc = json.loads(path.read_text(encoding="utf-8"))
        tables |= {f"{path.stem}/{t}" for t in doc["tables"]}
        if doc.get("figures"):
            tables.add(f"{path.stem}/figures")
    assert tables - shown == set(), "tables in benchmarks/results/ no page shows"
    assert shown - tables == set(), "blocks on docs/benchmarks/ pages with no data"


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.stem)
def test_every_measured_figure_says_where_it_came_from(path: Path) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["benchmark"] == path.stem and (ROOT / doc["script"]).exists()
    items = [("table " + k, t) for k, t in doc["tables"].items()] + [("figure " + f["id"], f)
                                                                       for f in doc.get("figures", [])]
    for name, item in items:
        p = {**doc.get("provenance", {}), **item.get("provenance", {})}
        missing = [k for k in ("measured", "commit", "source") if not p.get(k)]
        assert not missing, f"{path.name}: {name} lacks {missing}"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", p["measured"]), f"{path.name}: {name} measured {p['measured']!r}"
    for table_id, t in doc["tables"].items():
        keys = {k for c in t["columns"] for k in c.get("keys", [c.get("key")])}
        for row in t["rows"]:
            extra = set(row) - keys - {"_format"}
            assert not extra, f"{path.name}: {table_id} has values no column shows: {extra}"


def _links(text: str) -> list[str]:
    text = _CODE.sub("", _FENCE.sub("", text))
    return [t for t in _LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_that_exists(page: Path) -> None:
    broken = [t for t in _links(page.read_text(encoding="utf-8"))
              if not (page.parent / t.split("#", 1)[0]).exists()]
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_the_readme_stays_short_and_holds_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert 'pip install -e ".[test]" && python -m pytest' in text
    assert "pip install -e . && stopstorm --headless -u 6 -r 6 -t 20s" in text

"""The benchmark tables of docs/benchmarks/ (and of docs/guides/), generated from the data in benchmarks/results/*.json.

    python benchmarks/render_tables.py               # rewrite the tables between their markers
    python benchmarks/render_tables.py --check       # exit 1 if a page's tables differ from the data
    python benchmarks/render_tables.py --take RUN.json   # a run's `--json` tables replace the same tables in
                                                     # benchmarks/results/<benchmark>.json, then render

A page marks each generated block with a pair of comments; what lies between them is replaced:

    <!-- results: bench_simulator/capacity -->      a table (its provenance line follows it)
    <!-- /results -->
    <!-- results: bench_simulator/figures -->       the file's single figures, one row each
    <!-- /results -->

The data's shape is described in benchmarks/results_doc.py. Standard library only; tests/test_docs.py runs
`--check`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_doc import dumps  # beside this script (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGES = ROOT / "docs" / "benchmarks"
# Guides may hold measured tables too (docs/guides/proxies.md, blind-spot-and-churn.md): rendered the same way.
GUIDES = ROOT / "docs" / "guides"

__all__ = ["load_results", "main", "render_page", "take"]

_BLOCK = re.compile(r"(<!-- results: (?P<name>[\w-]+)/(?P<table>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def load_results(folder: Path = RESULTS) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))}


def _value(v: Any, fmt: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return fmt.format(v)


def _cell(row: dict[str, Any], col: dict[str, Any]) -> str:
    overrides = row.get("_format", {})
    # A multi-key cell leaves out a key the row lacks (a null prints as "–").
    keys = [k for k in col["keys"] if k in row] or col["keys"][:1] if "keys" in col else [col["key"]]
    parts = [_value(row.get(k), overrides.get(k, col.get("format", "{}"))) for k in keys]
    return col.get("sep", " / ").join(parts).replace("|", "\\|")


def _provenance(doc: dict[str, Any], item: dict[str, Any]) -> dict[str, str]:
    return {**doc.get("provenance", {}), **item.get("provenance", {})}


def _short(commit: str) -> str:
    """A commit as people quote it: 7 hex digits (and what follows, e.g. "with uncommitted changes")."""
    m = re.match(r"([0-9a-f]{40})(.*)", commit)
    return m.group(1)[:7] + m.group(2) if m else commit


def _source_line(p: dict[str, str]) -> str:
    short = _short(p.get("commit", ""))
    bits = [f"measured {p['measured']}" if p.get("measured") else "", f"commit `{short}`" if short else "",
            p.get("machine", "")]
    line = "; ".join(b for b in bits if b)
    cmd = f" Command: `{p['command']}`." if p.get("command") else ""
    return f"*Source: {p.get('source', 'unknown')} ({line}).{cmd}*"


def render_table(doc: dict[str, Any], table_id: str) -> str:
    t = doc["tables"][table_id]
    cols = t["columns"]
    out = ["| " + " | ".join(c["label"].replace("|", "\\|") for c in cols) + " |",
           "|" + "|".join("---:" if c.get("align") == "right" else "---" for c in cols) + "|"]
    out += ["| " + " | ".join(_cell(r, c) for c in cols) + " |" for r in t["rows"]]
    out += ["", _source_line(_provenance(doc, t))]
    if t.get("notes"):
        out += ["", f"*{t['notes']}*"]
    return "\n".join(out)


def render_figures(doc: dict[str, Any]) -> str:
    out = ["| figure | value | measured | source |", "|---|---:|---|---|"]
    for f in doc.get("figures", []):
        p = _provenance(doc, f)
        value = _value(f["value"], f.get("format", "{}"))
        unit = f" {f['unit']}" if f.get("unit") else ""
        label = f["label"] + (f" ({f['note']})" if f.get("note") else "")
        commit = _short(p.get("commit", ""))
        out.append(f"| {label} | {value}{unit} | {p.get('measured', '')} | {p.get('source', '')}"
                   f"{f', commit `{commit}`' if commit and commit[:7] not in p.get('source', '') else ''} |")
    return "\n".join(out)


def render_page(text: str, results: dict[str, dict[str, Any]]) -> str:
    def sub(m: re.Match[str]) -> str:
        name, table = m.group("name"), m.group("table")
        if name not in results:
            raise KeyError(f"no benchmarks/results/{name}.json for the block {name}/{table}")
        doc = results[name]
        if table == "figures":
            body = render_figures(doc)
        elif table in doc.get("tables", {}):
            body = render_table(doc, table)
        else:
            raise KeyError(f"benchmarks/results/{name}.json has no table {table!r}")
        return f"{m.group(1)}{body}\n{m.group(5)}"

    return _BLOCK.sub(sub, text)


def take(run_path: Path, folder: Path = RESULTS) -> Path:
    """Merge a run's tables and figures into the results file of its benchmark: same ids are replaced."""
    run = json.loads(run_path.read_text(encoding="utf-8"))
    target = folder / f"{run['benchmark']}.json"
    doc = json.loads(target.read_text(encoding="utf-8")) if target.exists() else {
        "benchmark": run["benchmark"], "script": run.get("script"), "provenance": {}, "tables": {}}
    for table_id, table in run.get("tables", {}).items():
        old = doc["tables"].get(table_id, {})
        table = {**table, "provenance": {**run["provenance"], **table.get("provenance", {})}}
        for key in ("title", "notes"):  # the page's wording stays unless the run brings its own
            if key in old and key not in table:
                table[key] = old[key]
        doc["tables"][table_id] = table
    if run.get("figures"):
        by_id = {f["id"]: f for f in doc.get("figures", [])}
        for f in run["figures"]:
            by_id[f["id"]] = {**f, "provenance": {**run["provenance"], **f.get("provenance", {})}}
        doc["figures"] = list(by_id.values())
    target.write_text(dumps(doc) + "\n", encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page is stale")
    ap.add_argument("--take", metavar="RUN_JSON", help="merge a run's --json output into benchmarks/results/ first")
    args = ap.parse_args(argv)
    if args.take:
        print(f"updated {take(Path(args.take)).relative_to(ROOT)}")
    results = load_results()
    stale = []
    for page in [*sorted(PAGES.glob("*.md")), *sorted(GUIDES.glob("*.md"))]:
        old = page.read_text(encoding="utf-8")
        new = render_page(old, results)
        if new == old:
            continue
        if args.check:
            stale.append(str(page.relative_to(ROOT)))
        else:
            page.write_text(new, encoding="utf-8")
            print(f"wrote {page.relative_to(ROOT)}")
    if stale:
        print(f"stale: {', '.join(stale)}; run `python benchmarks/render_tables.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

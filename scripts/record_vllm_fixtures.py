#!/usr/bin/env python3
"""Record the real-vLLM fixtures under tests/fixtures/vllm-0.32-cpu/ (manual; needs `real_vllm.py setup`).

One full stream and two streams closed early (after 5 and 10 chunks), each with its own X-Request-Id and
continuous usage stats; `/metrics` before and after; the server log; what each client received, as JSON.

    python3 scripts/record_vllm_fixtures.py [--cpus 1] [--out tests/fixtures/vllm-0.32-cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.real_vllm import RealVllm, _stream


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cpus", default=None)
    p.add_argument("--out", default="tests/fixtures/vllm-0.32-cpu")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "server.log"
    with RealVllm(log_path=log_path, max_num_seqs=2, cpus=args.cpus) as srv:
        time.sleep(1.0)
        before = _metrics(srv.url)
        streams = []
        for rid, cut in (("fix-full-1", None), ("fix-cut-5", 5), ("fix-cut-10", 10)):
            t0 = time.monotonic()
            res = _stream(srv.port, rid, max_chunks=cut)
            res.update(request_id=rid, max_chunks=cut, started_mono=t0)
            streams.append(res)
            time.sleep(1.0)
        time.sleep(1.0)
        after = _metrics(srv.url)
        startup = srv.startup_s
    (out / "metrics-before.txt").write_text(before)
    (out / "metrics-after.txt").write_text(after)
    (out / "streams.json").write_text(json.dumps({"startup_s": startup, "streams": streams}, indent=2) + "\n")
    print(json.dumps(streams, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Headless Chromium for the tests that look at a page as a person does: a screenshot, or the DOM after its
scripts ran (Locust's web UI is a React app: its form exists only once the script has run).

Debian's `chromium`; without it a test skips (under CI, where .ci/run installs it, it fails instead).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pytest

__all__ = ["chromium", "colour_counts", "dump_dom", "keep_screenshot", "need_chromium", "screenshot", "seen"]

_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def need_chromium() -> str:
    browser = chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return browser


def _run(args: Iterable[str], timeout: float) -> subprocess.CompletedProcess[str]:
    browser = need_chromium()
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([browser, *_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)


def screenshot(url: str, out: Path, size: tuple[int, int] = (1200, 3200), wait_ms: int = 0,
               timeout: float = 90) -> Path:
    """A PNG of `url` at `size`; `wait_ms` lets a page's scripts (and its polls) run first."""
    args = [f"--screenshot={out}", f"--window-size={size[0]},{size[1]}"]
    if wait_ms:
        args.append(f"--virtual-time-budget={wait_ms}")
    proc = _run([*args, url], timeout)
    assert out.exists(), proc.stderr[-2000:]
    return out


def dump_dom(url: str, wait_ms: int = 3000, timeout: float = 90) -> str:
    """The page's DOM as HTML once its scripts ran for `wait_ms` of virtual time."""
    proc = _run([f"--virtual-time-budget={wait_ms}", "--dump-dom", url], timeout)
    assert proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def colour_counts(png: Path, box: tuple[int, int, int, int] | None = None) -> dict[tuple[int, int, int], int]:
    """Pixels per colour of the screenshot (or of `box`: left, top, right, bottom)."""
    from PIL import Image

    img = Image.open(png).convert("RGB")
    if box is not None:
        img = img.crop(box)
    return {px: n for n, px in img.getcolors(maxcolors=1 << 24) or []}


def seen(counts: dict[tuple[int, int, int], int], rgb: tuple[int, int, int], tol: int = 12) -> int:
    """Pixels within `tol` of `rgb` on every channel."""
    return sum(n for px, n in counts.items() if all(abs(a - b) <= tol for a, b in zip(px, rgb, strict=True)))


def keep_screenshot(shot: Path, name: str) -> None:
    """Keep the screenshot for a person to look at when asked (STOPSTORM_KEEP_SCREENSHOT=DIR)."""
    keep = os.environ.get("STOPSTORM_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, Path(keep) / name)

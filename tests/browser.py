"""Headless Chromium for tests: DOM dumps and screenshots of local files (no network, fresh profile)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from htmlgen_utils.layout import CHROMIUM_FLAGS, find_chromium


def require_chromium() -> str:
    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Chromium (setup.sh installs Debian's chromium)")
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    return chromium


def _run(args: list[str], timeout: float = 90) -> str:
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [require_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    return result.stdout


def dump_dom(url: str) -> str:
    """The host document's DOM after load (its own scripts run; timers get 3 s of virtual time)."""
    return _run(["--virtual-time-budget=3000", "--dump-dom", url])


def screenshot_url(url: str, out: Path, width: int = 1000, height: int = 700) -> Path:
    out = Path(out).resolve()
    _run(["--virtual-time-budget=3000", f"--window-size={width},{height}", f"--screenshot={out}", url])
    assert out.exists(), f"Chromium wrote no screenshot for {url}"
    return out


def pixels(png: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)


def nonblank_fraction(png: Path) -> float:
    """Share of pixels that differ from the most common colour (0 = a blank, single-colour image)."""
    image = pixels(png).reshape(-1, 3)
    colours, counts = np.unique(image, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    return float((np.abs(image - background).sum(axis=1) > 30).mean())


def colour_fraction(png: Path, rgb: tuple[int, int, int], tolerance: int = 40) -> float:
    return float((np.abs(pixels(png) - np.array(rgb)).sum(axis=2) < tolerance).mean())

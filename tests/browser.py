"""Headless Chromium (Debian's ``chromium`` package) for the checks that open the MLflow UI as a
reviewer would: the page's DOM once its React app has rendered, or a screenshot.

No driver, no CDP client: ``--dump-dom`` and ``--screenshot`` with a virtual-time budget, which lets
the page run its scripts and finish its requests (virtual time stands still while a request is
pending) before the DOM is read or the picture taken.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
# no sandbox: CI runs as root in a container; the rest keeps a headless run from reaching the network
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")
BUDGET_MS = 5_000  # virtual ms for the MLflow UI to render once its requests are answered (they stop the clock)


def missing() -> str | None:
    """Why the browser checks cannot run here, or None when they can."""
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; run.py test installs it when run as root)"
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        proc = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def dump_dom(url: str, budget_ms: int = BUDGET_MS, timeout: float = 180) -> str:
    """The serialised DOM of ``url`` after ``budget_ms`` of virtual time."""
    return _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout).stdout


def screenshot(url: str, out: Path, size: tuple[int, int] = (1280, 1000), budget_ms: int = BUDGET_MS, timeout: float = 180) -> Path:
    """A PNG of ``url`` at ``size`` (width, height) after ``budget_ms`` of virtual time, written to ``out``."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--virtual-time-budget={budget_ms}", f"--window-size={size[0]},{size[1]}", f"--screenshot={out}", url], timeout)
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {out}")
    return out

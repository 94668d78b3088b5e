"""Helpers of the tests that start real servers (Prefect, MLflow) or process groups on loopback."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, procs=(), interval: float = 0.2, log: Path | None = None):
    """Poll ``predicate`` until it returns a true value (returned); fail at once if one of ``procs``
    exits. A failure quotes the end of ``log`` (the server's output) when given."""
    tail = lambda: f"\n{log.read_text(errors='replace')[-3000:]}" if log is not None and log.exists() else ""  # noqa: E731
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: a background process exited with {p.returncode}{tail()}")
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tail()}")


def healthy(url: str) -> bool:
    """Whether ``url``/health answers 200 (Prefect's API and MLflow's server both serve it)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False

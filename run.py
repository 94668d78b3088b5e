#!/usr/bin/env python3
"""Set up ``.venv`` (if missing or out of date) and run the demo or the tests.

    python3 run.py demo [pogdiff demo options]
    python3 run.py test [pytest options]

torch is installed first, pinned, so a CPU-only machine never pulls a multi-GB CUDA build; on a GPU
machine install the CUDA build of the same version into .venv first (docs/getting-started.md). ``test`` also
installs Debian's chromium for the browser check and Debian's postgresql for the team stack's test
when they are missing and apt-get can (as root), and runs pytest on one worker per core (pytest-xdist).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".pogdiff-installed"
TORCH = "torch==2.13.0"
UV = "uv==0.13.9"
MAX_TEST_WORKERS = 4  # each worker holds its own torch, MLflow and Prefect in memory
CHROMIUM = "/usr/bin/chromium"  # Debian's package, what tests/browser.py runs
POSTGRES_BIN = "/usr/lib/postgresql"  # Debian's server programs, <version>/bin (not on PATH), what tests/team/stack.py runs


def ensure_env() -> None:
    """(Re)install when pyproject.toml changed since the last successful install."""
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode() + UV.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == key and PY.exists():
        return
    if not PY.exists():
        print(f"creating {VENV.name}/ ...", flush=True)
        venv.create(VENV, with_pip=True)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print(f"installing {TORCH} ...", flush=True)
    subprocess.run([*pip, TORCH], check=True)
    print("installing the project and its dependencies ...", flush=True)
    # uv resolves and installs the ~200 packages several times faster than pip; torch stays pip's pinned
    # install above (the pin is in pyproject too, so uv keeps it and never reaches for a CUDA build).
    # --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set every
    # process would compile torch, prefect and mlflow from source at each import
    subprocess.run([*pip, UV], check=True)
    subprocess.run([str(PY.parent / ("uv.exe" if os.name == "nt" else "uv")), "pip", "install", "-q", "--compile-bytecode", "--python", str(PY), "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(key)


def _can_apt_install() -> bool:
    return bool(shutil.which("apt-get")) and hasattr(os, "geteuid") and os.geteuid() == 0


def _apt_install(package: str, skipped: str) -> None:
    """``apt-get install`` Debian's ``package``; when that fails, say so and that ``skipped`` will be."""
    print(f"installing {package} for {skipped} (apt-get) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]):
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            print(f"could not install {package} ({' '.join(cmd)}: exit {done.returncode}); {skipped} "
                  f"will be skipped:\n{done.stderr.strip()[-2000:]}", flush=True)
            return


def ensure_browser() -> None:
    """Install Debian's chromium for the browser check (tests/browser.py) where that is possible:
    Linux with apt-get, as root. Elsewhere, or when the install fails, the check is skipped and
    pytest's summary says why; the rest of the suite does not need a browser."""
    if Path(CHROMIUM).exists() or not _can_apt_install():
        return
    _apt_install("chromium", "the browser check")


def ensure_postgres() -> None:
    """Install Debian's PostgreSQL server for the team stack's test (tests/team/stack.py runs initdb,
    postgres and psql from it, on loopback, as an unprivileged account) where that is possible: Linux
    with apt-get, as root. Elsewhere, or when the install fails, the team stack's test is skipped and
    pytest's summary says why."""
    if shutil.which("initdb") or any(Path(POSTGRES_BIN).glob("*/bin/initdb")) or not _can_apt_install():
        return
    _apt_install("postgresql", "the team stack's test")


def parallel_options(args: list[str], env: dict[str, str]) -> list[str]:
    """pytest-xdist options: one worker per core, at most MAX_TEST_WORKERS, unless ``args`` choose
    (``-n ...``, ``-p no:xdist``). Most of the suite waits on servers and subprocesses, so two
    workers fill two cores; each worker's torch keeps to one thread (``env`` gets OMP_NUM_THREADS=1),
    as two workers of two threads each on two cores slow each other several-fold."""
    workers = min(os.cpu_count() or 1, MAX_TEST_WORKERS)
    if workers < 2 or any(a.startswith(("-n", "--numprocesses", "--dist")) or a == "no:xdist" for a in args):
        return []
    env.setdefault("OMP_NUM_THREADS", "1")
    return ["-n", str(workers), "--dist", "worksteal"]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__, file=sys.stderr)
        return 2
    ensure_env()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if argv[0] == "demo":
        cmd = [str(PY), "-m", "flows.cli", "demo", *argv[1:]]
    else:
        ensure_browser()
        ensure_postgres()
        cmd = [str(PY), "-m", "pytest", *argv[1:], *parallel_options(argv[1:], env)]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Process lifetime: children that die with their parent, one writer per run folder, and a garbage
collector that does not walk the imported libraries over and over.

A training child (the ``accelerate`` launcher and its DDP ranks) must not outlive the flow that
started it: an orphan would keep writing checkpoints into the run folder that the next retrain
resumes into. Two guards, each enough alone for its case:

- ``die_with_parent``: the kernel sends SIGKILL to this process when its parent dies (Linux
  ``PR_SET_PDEATHSIG``), so a SIGKILLed flow takes its launcher, and the launcher its ranks, along.
- ``WriterLock``: an exclusive ``flock`` on ``<run folder>/.writer.lock``, held by whoever trains
  into the folder; the kernel drops it when the holder dies, however it dies, so a second writer
  fails at once with the holder's pid while the first is alive, and never waits on a dead one.

Importing torch, diffusers, transformers, MLflow and Prefect leaves about 700 000 objects that live
as long as the process, and CPython's cyclic collector walks them at each full collection (0.5 s on
a 2-core machine): ten times and 150 middle-generation passes while they are imported, and again
while the interpreter shuts down, about 2 s each way per process. ``tune_gc`` removes that cost
and nothing else: garbage is still collected while the process runs.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import os
import signal
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock
    fcntl = None  # type: ignore[assignment]

PARENT_ENV = "POGDIFF_PARENT_PID"  # set by the spawner: the pid the child must outlive no longer than
_PR_SET_PDEATHSIG = 1


class RunFolderBusy(RuntimeError):
    """Another live process is training into the same run folder."""


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits; exit now if it already has.

    Linux only (elsewhere a no-op: the writer lock still prevents two writers). The parent that
    counts is the one named by ``POGDIFF_PARENT_PID`` when set, which closes the race of a parent
    that died between ``fork`` and this call (the child is then already re-parented).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    expected = os.environ.get(PARENT_ENV)
    if expected is not None and os.getppid() != int(expected):
        os._exit(1)  # the parent is already gone: nobody is waiting for this child


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) naming this process as the parent to outlive no longer than."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


class WriterLock:
    """``with WriterLock(folder):`` holds the folder's exclusive writer lock, or raises ``RunFolderBusy``."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".writer.lock"
        self._handle = None

    def __enter__(self) -> "WriterLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise RunFolderBusy(
                    f"run folder {self.path.parent} is being written by another process (pid {holder}); "
                    "stop it or wait for it before training into this folder again"
                ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            if fcntl is not None:
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def tune_gc() -> None:
    """Tune CPython's cyclic collector for a pipeline process (idempotent): young garbage is collected
    every 50 000 net allocations instead of 700 and promoted less often, so the full collections that
    importing triggers become rare while a long run still frees its cycles; and at exit every object
    is frozen (``gc.freeze``, an exit handler) before the interpreter's shutdown would walk them all."""
    gc.set_threshold(50_000, 50, 100)
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)

"""The ``pogdiff`` command line run in the test process (``flows.cli.main(argv)``), as a subprocess
would see it: its own environment, its exit status, and everything written to file descriptors 1
and 2 (pytest's ``capfd``, so Prefect's and MLflow's own handlers are captured too).

A command costs no interpreter start and no second import of torch, Prefect and MLflow; the
subprocess tests that remain are the ones about processes (kills, launchers, a fresh interpreter).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from contextlib import nullcontext
from dataclasses import dataclass

# Prefect sets its console logging up on first import: here, at collection, on the real stderr. Left to a
# command's own import it would bind to one test's captured stderr, and log into it after it closed.
import prefect.main  # noqa: F401
from prefect.settings import PREFECT_API_URL, temporary_settings

# what a test's environment must not leak into a command's (the command's env names its own)
_OWN = ("POGDIFF_", "MLFLOW_TRACKING_", "PREFECT_API_URL", "PREFECT_UI_URL")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class CommandTimeout(BaseException):
    """The alarm of ``run_cli(timeout=...)``: a BaseException, so the command's own error handling cannot take it for a failure."""


def _alarm(signum, frame):
    raise CommandTimeout


def run_cli(args: list[str], capfd, timeout: float | None = None, **env: str) -> Result:
    """Run ``pogdiff ARGS`` with ``env`` on top of the test's environment (minus its pipeline
    settings); os.environ is restored afterwards, whatever the command set. Prefect reads its
    settings once per process, so a ``PREFECT_API_URL`` is applied as a temporary setting.
    ``timeout``: stop the command after that many seconds (exit status 124, like timeout(1))."""
    from flows.cli import main

    saved = dict(os.environ)
    if timeout is not None:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    capfd.readouterr()  # what the test printed before is not the command's output
    try:
        for key in [k for k in os.environ if k.startswith(_OWN)]:
            del os.environ[key]
        os.environ.update(env)
        api = env.get("PREFECT_API_URL")
        with temporary_settings({PREFECT_API_URL: api}) if api else nullcontext():
            try:
                code = main(args)
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code if isinstance(exit_.code, int) else 2
            except Exception:  # what the interpreter does with an error main() lets through
                traceback.print_exc()
                code = 1
            except CommandTimeout:
                print(f"pogdiff {' '.join(args)}: stopped after {timeout} s", file=sys.stderr)
                code = 124
    finally:
        if timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        os.environ.clear()
        os.environ.update(saved)
    out, err = capfd.readouterr()
    return Result(code, out, err)

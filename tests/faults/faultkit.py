"""Helpers of the fault tests: a runner for `python -m flows.cli` subprocesses
that can be SIGKILLed as a group (the retrain and any child it started), as a machine crash would.

Every fault test records what it tried and what it saw through ``record``; with
``POGDIFF_FAULT_RESULTS=FILE`` set the rows are appended to FILE as JSON lines and
``python -m tests.faults.report FILE`` renders the fault table of docs/reliability.md from them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "faults-model"
EXPERIMENT = "faults"
# Prefect's "View at <UI>/runs/flow-run/<id>" line, written when a flow run begins
_FLOW_RUN_LINK = re.compile(r"/runs/flow-run/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


def record(fault: str, stage: str, outcome: str) -> None:
    """One row of the Reliability table (written only when POGDIFF_FAULT_RESULTS names a file)."""
    path = os.environ.get("POGDIFF_FAULT_RESULTS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"fault": fault, "stage": stage, "outcome": outcome}) + "\n")


def flow_run_id(output: str) -> UUID | None:
    """The id of the flow run a ``pogdiff`` command began, read from its own output (None before it
    began): the Prefect server is shared by every test of the session, so "the run that was not there
    before" could be another test's."""
    found = _FLOW_RUN_LINK.search(output)
    return UUID(found.group(1)) if found else None


def base_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    for key in [k for k in env if k.startswith(("POGDIFF_", "PREFECT_API_URL", "MLFLOW_TRACKING"))]:
        env.pop(key)
    return env


@dataclass
class Retrain:
    """A ``pogdiff retrain`` subprocess in its own session (so one killpg takes every child too)."""

    proc: subprocess.Popen
    log: Path

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def wait(self, timeout: float = 600) -> tuple[int, str]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"retrain still running after {timeout} s:\n{self.log.read_text()[-4000:]}") from None
        return self.proc.returncode, self.log.read_text()


def cli_env(home: Path, prefect_api: str | None, **extra: str) -> dict[str, str]:
    env = {**base_env(), "POGDIFF_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), **extra}
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    return env


def start_cli(args: list[str], env: dict[str, str], log: Path, python: list[str] | None = None) -> Retrain:
    """``python -m flows.cli ARGS`` (or ``python`` + ``python`` args, e.g. a fault-injecting ``-c``)."""
    out = open(log, "w")
    cmd = [sys.executable, *(python or ["-m", "flows.cli"]), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Retrain(proc, log)

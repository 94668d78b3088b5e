"""Prefect process workers on the team stack (tests/team/stack.py), as separate hosts would run them:
each with its own home and nothing local shared but the documented shared volume (``runs_dir``),
its stores and credentials from the environment compose.yaml gives the pipeline's worker.

A worker is a real ``prefect worker start --pool POOL --work-queue QUEUE`` process in its own
session; the flow runs it starts are its child processes, and ``kill_flow_runs`` SIGKILLs them as
a crash of that host's flow-run process would (the worker itself lives on and reports the run Crashed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# what the test process's own environment must not hand a worker (the worker's env names its own)
_OWN = ("POGDIFF_", "PREFECT_", "MLFLOW_", "AWS_")


def worker_env(team, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a pipeline process whose home is ``home``: compose.yaml's ``x-pipeline-env``
    at loopback (credentials as variables, the settings file written into ``home``), this checkout's
    code and programs, and ``extra`` (e.g. ``POGDIFF_DATASET_URI``)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(_OWN)}
    env = {**base, **team.pipeline_env(home),
           "POGDIFF_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # a worker looks for due runs every second, not every 10
           "PREFECT_WORKER_QUERY_SECONDS": "1", **extra}
    return env


def prefect(args: list[str], env: dict[str, str], log: Path, timeout: float = 120) -> str:
    """``prefect ARGS`` (this environment's) run to its end from the repository root; its output,
    also appended to ``log``. A non-zero exit fails with that output."""
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    with open(log, "a") as f:
        f.write(f"$ prefect {' '.join(args)}\n{out}\n")
    assert proc.returncode == 0, f"prefect {' '.join(args)} exited with {proc.returncode}:\n{out[-3000:]}"
    return out


@dataclass
class Worker:
    name: str
    home: Path
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def flow_run_processes(self) -> list[int]:
        """Live processes the worker started (its flow runs and what they started), deepest last."""
        return descendants(self.proc.pid)

    def kill_flow_runs(self) -> list[int]:
        """SIGKILL every process the worker started (not the worker); the pids killed."""
        pids = self.flow_run_processes()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def stop(self) -> None:
        """SIGTERM to the worker's session (it and any flow run it still runs), SIGKILL after 20 s."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # a flow run isolated in its own session outlives the worker's group: its own pids
        for pid in descendants(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start_worker(name: str, pool: str, queue: str, env: dict[str, str], log: Path) -> Worker:
    """``prefect worker start --pool POOL --work-queue QUEUE --name NAME`` in its own session; not waited for."""
    out = open(log, "w")  # noqa: SIM115 - the worker writes it for its whole life
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--work-queue", queue,
                             "--name", name],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    return Worker(name, Path(env["POGDIFF_HOME"]), proc, log)


def _children() -> dict[int, list[int]]:
    """parent pid -> live (not zombie) child pids, from /proc."""
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            out.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return out


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid``, parents before their children."""
    children, out, todo = _children(), [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def leaked(text: str, secrets: dict[str, str]) -> list[str]:
    """The names of ``secrets`` whose value appears in ``text``."""
    return [name for name, value in secrets.items() if value and value in text]

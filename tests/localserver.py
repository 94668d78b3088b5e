"""Helpers of the tests that start real servers (Prefect, MLflow) or process groups on loopback."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


# The Prefect server this process started for its pytest session (shared_prefect_server), by pid:
# kept so that it is reaped here when this process stops it, and never collected while it runs.
_STARTED: dict[int, subprocess.Popen] = {}

# An MLflow SQLite database its migrations were run on once this session (conftest's
# mlflow_schema_once), or None before that: MLflow takes about 1.3 s to migrate each new one.
MLFLOW_SCHEMA: Path | None = None


def seed_mlflow_store(db: Path) -> None:
    """Start the SQLite MLflow store ``db`` (of a server or a subprocess) as a copy of the session's
    migrated schema; a ``db`` that exists is left as it is."""
    if MLFLOW_SCHEMA is not None and not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MLFLOW_SCHEMA, db)


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


def start_mlflow_server(root: Path, port: int, auth: tuple[str, str] | None = None,
                        backend_store_uri: str | None = None, host: str = "127.0.0.1",
                        artifacts_destination: str | None = None, auth_settings: dict[str, str] | None = None,
                        env: dict[str, str] | None = None) -> subprocess.Popen:
    """A real ``mlflow server`` on ``host``:``port`` (a loopback address), SQLite backend and proxied
    artifacts under ``root`` (restartable on the same store), in its own process group; not waited for.
    ``backend_store_uri`` serves an existing store instead (e.g. the demo's ``sqlite:///var/mlflow.db``,
    whose runs keep their own artifact locations).

    With ``auth=(user, password)`` it runs MLflow's basic-auth app (``--app-name basic-auth``): every
    request but ``/health`` needs those credentials (the user is the admin), others get 401.
    ``auth_settings`` replace keys of its ``[mlflow]`` section (e.g. ``database_uri`` of a PostgreSQL
    user store). ``artifacts_destination`` (e.g. ``s3://bucket/mlflow``) replaces ``root``/artifacts,
    and ``env`` is added to the server's environment (its S3 endpoint and keys, ``PGPASSWORD``)."""
    mlflow_exe = Path(sys.executable).parent / "mlflow"
    if backend_store_uri is None:
        seed_mlflow_store(root / "mlflow.db")
    log = open(root / "server.log", "a")  # noqa: SIM115 - the server writes it for its whole life
    # No job runner: MLflow 3 starts four huey consumer processes per server for its GenAI jobs, none
    # of which the pipeline uses (a minute of CPU across the suite's servers on 2 cores).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    app = []
    if auth is not None:
        ini = root / "basic_auth.ini"
        # the credential check cache spares a PBKDF2 hash per request (one worker: never stale)
        keys = {"default_permission": "NO_PERMISSIONS", "database_uri": f"sqlite:///{root / 'auth.db'}",
                "admin_username": auth[0], "admin_password": auth[1],
                "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
                "auth_cache_ttl_seconds": "600", **(auth_settings or {})}
        ini.write_text("[mlflow]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items()))
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = os.urandom(16).hex()  # the auth app's CSRF key (required)
        app = ["--app-name", "basic-auth"]
    if host != "127.0.0.1":  # the server turns away Host headers, and the UI's POSTs from origins, other than localhost's unless told
        app += ["--allowed-hosts", f"{host},{host}:{port}", "--cors-allowed-origins", f"http://{host}:{port}"]
    return subprocess.Popen(
        [str(mlflow_exe), "server", *app, "--host", host, "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", artifacts_destination or str(root / "artifacts"), "--serve-artifacts"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it and its workers), SIGKILL after 5 s; a group that is
    gone already is fine. A test server's store is thrown away or reopened after a crash-safe SQLite
    stop, and the server's graceful stop took 8–16 s in the suite."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except ProcessLookupError:
        proc.wait()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_prefect_server(root: Path, port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A real ``prefect server start`` on 127.0.0.1:``port``, its home and ``server.log`` in ``root``
    (SQLite there unless ``env`` names another database), no UI, in its own process group; not
    waited for. ``env`` is added to its environment (e.g. ``PREFECT_SERVER_API_AUTH_STRING``)."""
    env = {**os.environ, "PREFECT_HOME": str(root), "PREFECT_UI_ENABLED": "false", "OMP_NUM_THREADS": "1",
           # a run held back by a deployment's concurrency limit retries after 2 s, not 30 (tests/flows/test_scheduling.py)
           "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2", **(env or {})}
    env.pop("PREFECT_API_URL", None)
    log = open(root / "server.log", "w")  # noqa: SIM115 - the server writes it for its whole life
    return subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def shared_prefect_server(shared: Path) -> str:
    """The API URL of the one real ``prefect server start`` of a pytest session, started by whichever
    of its processes (pytest-xdist workers) asks first; ``shared`` is a folder all of them see. The
    server lives until ``stop_shared_prefect_server``, whichever worker started it."""
    info, root = shared / "prefect-server.json", shared / "prefect-server"
    with open(shared / "prefect-server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter; the others read what it wrote
        if not info.exists():
            root.mkdir()
            port = free_port()
            server = start_prefect_server(root, port)
            _STARTED[server.pid] = server
            info.write_text(json.dumps({"api": f"http://127.0.0.1:{port}/api", "pid": server.pid}))
    server = json.loads(info.read_text())
    started_here = [_STARTED[server["pid"]]] if server["pid"] in _STARTED else []
    wait_for(lambda: healthy(server["api"]), 240, "the Prefect server", started_here, interval=0.5, log=root / "server.log")
    return server["api"]


def stop_shared_prefect_server(shared: Path) -> None:
    """SIGTERM to the session's Prefect server (its process group), SIGKILL after 30 s; nothing when
    no process of the session started one."""
    info = shared / "prefect-server.json"
    if not info.exists():
        return
    pid = json.loads(info.read_text())["pid"]
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    server = _STARTED.pop(pid, None)
    if server is None:  # a worker started it and has exited: init reaps it, this process cannot wait() for it
        gone = lambda: not _alive(pid)  # noqa: E731
    else:
        gone = lambda: server.poll() is not None  # noqa: E731
    deadline = time.monotonic() + 30
    while not gone():
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            break
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

"""Shared fixtures: tiny random models, and one real Prefect server for the whole session (started on
first use: one database migration, not one per test module)."""

import os
import signal
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# The test server's telemetry writes race the flow's writes on its SQLite file ("database is locked").
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402
from localserver import free_port, healthy, wait_for  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402

from pogdiff.pipelines.pixel import UNetSpec  # noqa: E402

TINY = UNetSpec(image_size=16, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)


@pytest.fixture(scope="session")
def tiny_spec() -> UNetSpec:
    return TINY


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """URL of a real ``prefect server start`` shared by every test that runs flows (in process or in
    a subprocess); tests tell their runs apart by flow-run id, never by counting."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(root), "PREFECT_UI_ENABLED": "false", "OMP_NUM_THREADS": "1",
           # a run held back by a deployment's concurrency limit retries after 2 s, not 30 (tests/flows/test_scheduling.py)
           "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2"}
    env.pop("PREFECT_API_URL", None)
    log = open(root / "server.log", "w")  # noqa: SIM115 - the server writes it for the whole session
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: healthy(api), 240, "the Prefect server", [server], interval=0.5, log=root / "server.log")
        yield api
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def prefect_server(prefect_api):
    """In-process flows of this module report to the session's Prefect server."""
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        yield prefect_api

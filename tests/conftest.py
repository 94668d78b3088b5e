"""Shared fixtures: tiny random models, and one real Prefect server for the whole session (started on
first use: one database migration, not one per test module)."""

import gc
import os
import signal
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# The test server's telemetry writes race the flow's writes on its SQLite file ("database is locked").
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# The suite's processes import torch, diffusers, MLflow and Prefect once and keep them: the pipeline
# processes' collector settings (pogdiff.process), and what collection imported frozen once it is done.
from pogdiff.process import tune_gc  # noqa: E402

tune_gc()

import localserver  # noqa: E402
import pytest  # noqa: E402
from localserver import free_port, healthy, wait_for  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402

from pogdiff.pipelines.pixel import UNetSpec  # noqa: E402

TINY = UNetSpec(image_size=16, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)


def pytest_collection_finish(session):
    gc.freeze()


@pytest.fixture(scope="session")
def tiny_spec() -> UNetSpec:
    return TINY


@pytest.fixture(scope="session", autouse=True)
def mlflow_schema_once(tmp_path_factory):
    """Most tests open a fresh SQLite MLflow store, and MLflow builds each one by running its schema
    migrations (about 1.3 s). This process runs them once, into a template, and every new store it
    opens afterwards starts as a copy of that database (SQLite's backup): the schema MLflow's own
    migrations made, on the same MLflow version; the store creates its Default experiment itself.
    Servers and CLI subprocesses the tests start get a copy of the file (``localserver.seed_mlflow_store``)."""
    import sqlite3

    import mlflow.store.db.utils as db_utils
    import sqlalchemy

    migrate = db_utils._initialize_tables
    template = tmp_path_factory.mktemp("mlflow-schema") / "template.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{template}")
    migrate(engine)
    engine.dispose()
    source = sqlite3.connect(template)

    def initialize_tables(engine):
        if engine.dialect.name != "sqlite":
            return migrate(engine)
        raw = engine.raw_connection()
        try:
            source.backup(raw.driver_connection)
        finally:
            raw.close()

    db_utils._initialize_tables = initialize_tables
    localserver.MLFLOW_SCHEMA = template
    try:
        yield
    finally:
        db_utils._initialize_tables = migrate
        localserver.MLFLOW_SCHEMA = None
        source.close()


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

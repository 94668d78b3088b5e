"""Shared fixtures: tiny random models, and one real Prefect server for the whole session and all its
workers (started on first use: one database migration, not one per worker or test module)."""

import gc
import os
from pathlib import Path

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


def _session_folder(tmp_path_factory) -> Path:
    """A folder every process of this pytest session sees: the base temporary folder, whose
    sub-folders pytest-xdist's workers get as theirs."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """URL of the session's one real ``prefect server start``, shared by every test that runs flows,
    in process or in a subprocess, on every worker; tests tell their runs apart by flow-run id
    (``faultkit.flow_run_id``), never by counting or by what was there before."""
    return localserver.shared_prefect_server(_session_folder(tmp_path_factory))


def pytest_sessionfinish(session):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller (or a run without workers), after every test
        localserver.stop_shared_prefect_server(session.config._tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def prefect_server(prefect_api):
    """In-process flows of this module report to the session's Prefect server."""
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        yield prefect_api

"""The team topology on loopback (tests/team/stack.py, the processes of deploy/team/compose.yaml):
MLflow and Prefect keep their state in PostgreSQL, MLflow's artifacts pass through its proxy into
the S3 bucket, and nobody gets in without credentials.

One test, on purpose: the stack takes about half a minute to come up, and pytest-xdist would start
one per worker for tests spread over several."""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from pathlib import Path

import botocore.exceptions
import psycopg
import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

pytestmark = pytest.mark.slow  # starts PostgreSQL, an S3 server, MLflow and Prefect: see pyproject's marker


def _status(url: str, method: str = "GET", auth: tuple[str, str] | None = None, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, method=method, data=body, headers={"Content-Type": "application/json"})
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _uid(pid: int) -> int:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
    return int(line.split()[1])


def test_team_stack_needs_credentials_and_keeps_artifacts_in_s3(team_stack, tmp_path, monkeypatch):
    stack = team_stack
    user, password = stack.mlflow_account

    # PostgreSQL never runs as root
    assert _uid(stack.postgres.proc.pid) != 0

    # Nobody gets in without credentials: MLflow's basic-auth app, Prefect's auth string, S3's signatures.
    search = f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(search) == 401
    assert _status(search, auth=(user, "wrong")) == 401
    assert _status(search, auth=(user, password)) == 200
    pools = f"{stack.prefect_api}/work_pools/filter"
    assert _status(pools, "POST", body=b"{}") == 401
    assert _status(pools, "POST", auth=("pogdiff", "wrong"), body=b"{}") == 401
    assert _status(pools, "POST", auth=tuple(stack.prefect_auth_string.split(":", 1)), body=b"{}") == 200
    # the health probes stay open (compose's healthchecks use them)
    assert _status(f"{stack.mlflow_uri}/health") == 200 and _status(f"{stack.prefect_api}/health") == 200
    # an unsigned listing is refused (moto answers 500 where MinIO answers 403: it expects a signature),
    # and so is a listing signed with a wrong secret
    assert _status(f"{stack.s3.endpoint}/{stack.s3.bucket}") in (403, 500)
    with pytest.raises(botocore.exceptions.ClientError, match="SignatureDoesNotMatch"):
        stack.s3.client(secret_key="wrong").list_objects_v2(Bucket=stack.s3.bucket)

    # An authenticated MLflow client (credentials from the environment, as the pipeline passes them)
    # logs a run whose artifact the server's proxy writes into the bucket.
    for name, value in stack.pipeline_env(tmp_path / "home").items():  # compose.yaml's worker environment
        monkeypatch.setenv(name, value)
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (user, password)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a failure fails now, not after minutes of backoff
    client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    experiment = client.create_experiment("team-stack")
    run = client.create_run(experiment)
    client.log_param(run.info.run_id, "store", "postgresql")
    payload = os.urandom(2048)
    (tmp_path / "weights.bin").write_bytes(payload)
    client.log_artifact(run.info.run_id, str(tmp_path / "weights.bin"), artifact_path="model")
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:")  # through the proxy

    s3 = stack.s3.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.s3.bucket, Prefix="mlflow/")["Contents"]]
    (key,) = [k for k in keys if k.endswith(f"{run.info.run_id}/artifacts/model/weights.bin")]
    assert s3.get_object(Bucket=stack.s3.bucket, Key=key)["Body"].read() == payload
    assert _status(f"{stack.s3.endpoint}/{stack.s3.bucket}/{key}") == 403  # no anonymous reads
    assert Path(client.download_artifacts(run.info.run_id, "model/weights.bin", str(tmp_path / "back"))).read_bytes() == payload

    # A Prefect client with the auth string creates a work pool; one with a wrong string is refused.
    with temporary_settings({PREFECT_API_URL: stack.prefect_api, PREFECT_API_AUTH_STRING: "pogdiff:wrong"}):
        with get_client(sync_client=True) as prefect, pytest.raises(PrefectHTTPStatusError, match="401"):
            prefect.read_work_pools()
    with temporary_settings({PREFECT_API_URL: stack.prefect_api, PREFECT_API_AUTH_STRING: stack.prefect_auth_string}):
        with get_client(sync_client=True) as prefect:
            prefect.create_work_pool(WorkPoolCreate(name="team", type="process"))
            assert prefect.read_work_pool("team").type == "process"

    # Both servers keep their state in PostgreSQL (the databases init-databases.sql created).
    with psycopg.connect(stack.postgres.url("mlflow")) as db:
        assert db.execute("SELECT name FROM experiments WHERE experiment_id = %s", (int(experiment),)).fetchone() == ("team-stack",)
        assert db.execute("SELECT key, value FROM params WHERE run_uuid = %s", (run.info.run_id,)).fetchall() == [("store", "postgresql")]
    with psycopg.connect(stack.postgres.url("mlflow_auth")) as db:
        assert db.execute("SELECT username, is_admin FROM users").fetchall() == [(user, True)]
    with psycopg.connect(stack.postgres.url("prefect")) as db:
        assert db.execute("SELECT type FROM work_pool WHERE name = 'team'").fetchone() == ("process",)

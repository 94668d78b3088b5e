"""Who may do what on the team stack (tests/team/stack.py), through the ``pogdiff`` command line: a
reader account lists and compares but cannot move an alias, and wrong credentials, for MLflow and
for Prefect, are one line naming the server, exit 2, with no credential in anything a command prints.

Unauthenticated requests to both servers are refused: tests/team/test_stack.py checks that.

One test, on purpose (as test_stack.py): the stack takes about half a minute to come up, and
pytest-xdist would start one per worker for tests spread over several. Every command runs in
process (tests/clirunner.py), with the environment compose.yaml gives the pipeline's worker.
"""

from __future__ import annotations

import json
import secrets
import uuid

import pytest
from clirunner import run_cli
from mlflow.tracking import MlflowClient
from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings

pytestmark = pytest.mark.slow  # starts PostgreSQL, an S3 server, MLflow and Prefect: see pyproject's marker

TIMEOUT_S = 60  # a command that hangs on a server is what the alarm catches (generous for 2 busy cores)
READER = "reader"
METRICS = {"1": {"few/grecall": 0.5, "many/accuracy": 0.9, "overall/frechet_pixels16": 20.0},
           "2": {"few/grecall": 0.6, "many/accuracy": 0.9, "overall/frechet_pixels16": 19.0}}


def _admin_client(stack, env: pytest.MonkeyPatch) -> MlflowClient:
    user, password = stack.mlflow_account
    env.setenv("MLFLOW_TRACKING_USERNAME", user)
    env.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)


def _register(stack, name: str) -> str:
    """As the admin, what a retrain registers, without training: an experiment with a run per
    version holding its ``<bucket>/<metric>`` evaluation, version 1 champion, version 2 challenger.
    Returns the experiment's id."""
    with pytest.MonkeyPatch.context() as env:
        client = _admin_client(stack, env)
        experiment = client.create_experiment(name)
        client.create_registered_model(name)
        for version, metrics in METRICS.items():
            run = client.create_run(experiment)
            for key, value in metrics.items():
                client.log_metric(run.info.run_id, key, value)
            client.set_terminated(run.info.run_id)
            assert client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version == version
        client.set_registered_model_alias(name, "champion", "1")
        client.set_registered_model_alias(name, "challenger", "2")
    return experiment


def test_a_reader_lists_and_compares_but_cannot_promote_and_wrong_credentials_are_one_line(team_stack, tmp_path, capfd):
    stack = team_stack
    name = f"team-{uuid.uuid4().hex[:6]}"
    experiment = _register(stack, name)
    reader_password = secrets.token_urlsafe(18)
    stack.add_mlflow_user(READER, reader_password, {("experiment", experiment): "READ", ("registered_model", name): "READ"})
    wrong_password, wrong_auth = f"wrong-{secrets.token_urlsafe(9)}", f"pogdiff:wrong-{secrets.token_urlsafe(9)}"
    credentials = {"MLflow admin password": stack.mlflow_account[1], "MLflow reader password": reader_password,
                   "Prefect auth string": stack.prefect_auth_string, "Prefect auth token": stack.prefect_auth_string.split(":", 1)[1],
                   "S3 secret key": stack.s3.secret_key, "PostgreSQL password": stack.postgres.password,
                   "wrong MLflow password": wrong_password, "wrong Prefect auth string": wrong_auth}
    worker = stack.pipeline_env(tmp_path / "home")  # the worker's environment: the admin's account, S3 keys, Prefect's auth string
    reader = {**worker, "MLFLOW_TRACKING_USERNAME": READER, "MLFLOW_TRACKING_PASSWORD": reader_password}
    host = stack.mlflow_uri.split("://", 1)[1]
    in_uri = {**worker, "POGDIFF_MLFLOW_TRACKING_URI": f"http://{READER}:{reader_password}@{host}"}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        in_uri.pop(key)

    def pogdiff(args: list[str], env: dict[str, str]):
        out = run_cli(args, capfd, timeout=TIMEOUT_S, **env)
        for what, value in credentials.items():
            assert value not in out.output, f"pogdiff {' '.join(args)}: the {what} appears in its output:\n{out.output[-3000:]}"
        assert "Traceback" not in out.output, out.output[-3000:]
        return out

    def one_line(out) -> str:
        lines = out.output.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.output[-3000:]
        return lines[0]

    # The reader lists and compares, with the account in MLflow's variables or in the tracking URI.
    for env in (reader, in_uri):
        listed = pogdiff(["models", "--json", "--model", name], env)
        assert listed.returncode == 0, listed.output[-3000:]
        assert [(v["version"], v["aliases"], v["metrics"]) for v in json.loads(listed.stdout)] == \
            [("2", ["challenger"], METRICS["2"]), ("1", ["champion"], METRICS["1"])]
    compared = pogdiff(["compare", "champion", "challenger", "--model", name, "--json"], reader)
    assert compared.returncode == 0, compared.output[-3000:]
    rows = {(r["bucket"], r["metric"]): (r["a"], r["b"]) for r in json.loads(compared.stdout)["rows"]}
    assert rows[("few", "grecall")] == (0.5, 0.6) and rows[("overall", "frechet_pixels16")] == (20.0, 19.0)
    assert pogdiff(["compare", "champion", "challenger", "--model", name], in_uri).returncode == 0

    # ... but cannot move an alias: one line naming the server, the account and the permission it lacks.
    refused = f"error: MLflow tracking server {stack.mlflow_uri} denied account 'reader' the permission for " \
              "model-versions/set-tag: it needs EDIT on the registered model; an MLflow admin grants it"
    for env in (reader, in_uri):
        assert one_line(pogdiff(["promote", "challenger", "--reason", "x", "--model", name], env)) == refused
    with pytest.MonkeyPatch.context() as admin_env:
        client = _admin_client(stack, admin_env)
        assert client.get_registered_model(name).aliases == {"champion": "1", "challenger": "2"}
        assert "promoted_by" not in client.get_model_version(name, "2").tags

    # Wrong MLflow credentials, in the variables or in the URI: every command that reads the registry says so in one line.
    bad = {**worker, "MLFLOW_TRACKING_PASSWORD": wrong_password}
    bad_in_uri = {**in_uri, "POGDIFF_MLFLOW_TRACKING_URI": f"http://{READER}:{wrong_password}@{host}"}
    rejected = f"error: MLflow tracking server {stack.mlflow_uri} refused the credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
    for args in (["models"], ["promote", "challenger", "--reason", "x", "--model", name],
                 ["compare", "champion", "challenger", "--model", name], ["evaluate", f"{name}@champion"]):
        for env in (bad, bad_in_uri):
            assert one_line(pogdiff(args, env)) == rejected, args

    # A wrong Prefect auth string: the command that talks to Prefect says so in one line. Prefect reads
    # its settings once per process, so the string is a temporary setting (the worker's env has the right one).
    with temporary_settings({PREFECT_API_AUTH_STRING: wrong_auth}):
        served = pogdiff(["serve", "--deployment", "retrain-nightly"], worker)
    assert one_line(served) == f"error: Prefect server {stack.prefect_api} refused the credentials " \
                               "(PREFECT_API_AUTH_STRING, or PREFECT_API_KEY for Prefect Cloud)"

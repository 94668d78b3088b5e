"""The retrain report (Prefect markdown artifact) and the MLflow link in it."""

from uuid import UUID

from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

from storage.links import redact_text, redact_uri
from storage.mlflow import connection, runs
from storage.settings import load_settings
from tasks.report import publish_report, render_report


def test_report_has_the_bucket_table_with_deltas_and_the_decision():
    metrics = {"few/grecall": 0.5, "many/grecall": 0.7, "overall/grecall": 0.6, "few/accuracy": 0.9}
    decision = {"model_name": "m", "version": "3", "promoted": False, "reason": "few/grecall 0.5 not > 0.6",
                "champion_metrics": {"few/grecall": 0.6, "many/grecall": 0.65}}
    md = render_report(metrics, decision, "run123", "http://mlflow:5000/#/experiments/1/runs/run123", "snap1")
    assert "## Retrain: m version 3" in md
    assert "stays `challenger`" in md and "few/grecall 0.5 not > 0.6" in md
    assert "| few | grecall | 0.500 | 0.600 | -0.100 |" in md
    assert "| many | grecall | 0.700 | 0.650 | +0.050 |" in md
    assert "| few | accuracy | 0.900 | — | — |" in md
    assert "[open in MLflow](http://mlflow:5000/#/experiments/1/runs/run123)" in md and "`snap1`" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "bucket" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["many", "few", "few", "overall"]  # bucket order


def test_credentials_never_reach_a_link():
    assert redact_uri("http://alice:s3cret@mlflow:5000/x") == "http://***@mlflow:5000/x"
    assert redact_uri("http://mlflow:5000") == "http://mlflow:5000"
    assert redact_uri("sqlite:///var/mlflow.db") == "sqlite:///var/mlflow.db"
    assert redact_uri("http://bob@mlflow:5000", mask=False) == "http://mlflow:5000"


def test_the_published_report_links_the_run_without_the_ui_urls_secrets(prefect_server, tmp_path):
    """The report task on settings whose MLflow UI URL carries a password and a token: the artifact
    stored on the Prefect server links the real run (its experiment id, from the store) and holds
    neither secret."""
    settings = load_settings(home=tmp_path, mlflow_ui_url="https://alice:s3cret-pw@mlflow.example.org/?token=t0k3n")
    connection.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    with runs.run("report-links") as run_id:
        experiment = MlflowClient().get_run(run_id).info.experiment_id
    decision = {"model_name": "m", "version": "1", "promoted": True, "reason": "no champion yet", "champion_metrics": {}}
    artifact_id = publish_report.fn(settings, {"few/grecall": 0.5}, decision, run_id, "snap1")
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[UUID(artifact_id)])))
    assert f"(https://***@mlflow.example.org/?token=***#/experiments/{experiment}/runs/{run_id})" in artifact.data
    assert "s3cret-pw" not in artifact.data and "t0k3n" not in artifact.data


def test_secret_query_parameters_are_redacted_in_uris_and_text():
    signed = ("https://bucket.s3.amazonaws.com/m.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA123%2F2026"
              "&X-Amz-Signature=abc123&X-Amz-Security-Token=FwoG")
    assert redact_uri(signed) == ("https://bucket.s3.amazonaws.com/m.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                                  "&X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***")
    assert redact_uri("http://u:pw@mlflow:5000/api?access_token=t0k&page=2") == "http://***@mlflow:5000/api?access_token=***&page=2"
    assert redact_uri("https://x.blob.core.windows.net/c/f?sv=2024&sig=s1gn") == "https://x.blob.core.windows.net/c/f?sv=2024&sig=***"
    text = "error: cannot reach http://alice:pw@host:5000/x?api_key=K3Y (and https://h/y?token=T0K&v=1): refused"
    out = redact_text(text)
    assert not any(secret in out for secret in ("alice", ":pw@", "K3Y", "T0K"))
    assert out == "error: cannot reach http://***@host:5000/x?api_key=*** (and https://h/y?token=***&v=1): refused"
    assert redact_text("monkey=1&keyboard=2") == "monkey=1&keyboard=2"  # only whole parameter names

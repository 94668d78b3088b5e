"""The retrain report (Prefect markdown artifact) and the MLflow links in it."""

import glob
import json
import re
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from uuid import UUID

import mlflow
import pytest
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

from storage.links import redact_text, redact_uri
from storage.mlflow import connection, runs
from storage.settings import load_settings
from tasks.report import publish_report, render_report
from tasks.results import Registration

LINKS = {"run": "http://mlflow:5000/#/experiments/1/runs/run123", "version": "http://mlflow:5000/#/models/m/versions/3",
         "compare": "http://mlflow:5000/#/compare-runs?runs=x"}


def _decision(**fields) -> Registration:
    """A registration as the register task returns it: the gate decided, checks left out."""
    return Registration(decided_by="gate", checks={}, **fields)


def test_report_has_the_bucket_table_with_deltas_and_the_decision():
    metrics = {"few/grecall": 0.5, "many/grecall": 0.7, "overall/grecall": 0.6, "few/accuracy": 0.9}
    decision = _decision(model_name="m", version="3", promoted=False, reason="few/grecall 0.5 not > 0.6", run_id="run123",
                         champion_before="2", champion_metrics={"few/grecall": 0.6, "many/grecall": 0.65}, champion_run_id=None)
    md = render_report({**metrics, "overall/frechet_pixels16": 12.0}, decision, LINKS, "snap1")
    assert "## Retrain: m version 3" in md
    assert "stays `challenger`" in md and "few/grecall 0.5 not > 0.6" in md
    # a row per metric with its better direction, a column per bucket, each cell the value and its delta
    # against the champion, whose values follow in their own row; what each metric means below the table
    assert "| metric | many | few | overall |" in md
    assert "| grecall ↑ | 0.700 (+0.050) | 0.500 (-0.100) | 0.600 |" in md
    assert "| ↳ champion v2 | 0.650 | 0.600 | — |" in md
    assert "| accuracy ↑ | — | 0.900 | — |" in md
    assert "| frechet_pixels16 ↓ | — | — | 12.000 |" in md
    assert "- `frechet_pixels16` (lower is better): Fréchet distance" in md and "Why overall differs" in md
    assert ("[run `run123`](http://mlflow:5000/#/experiments/1/runs/run123) · [m version 3](http://mlflow:5000/#/models/m/versions/3)"
            " · [this run beside champion v2's](http://mlflow:5000/#/compare-runs?runs=x)") in md and "`snap1`" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "| metric |" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["grecall ↑", "↳ champion v2", "accuracy ↑", "frechet_pixels16 ↓"]
    # without a UI address: the ids, and how to get links
    plain = render_report(metrics, decision, dict.fromkeys(LINKS), "snap1")
    assert "run `run123` · m version 3 (set POGDIFF_MLFLOW_UI_URL for links)" in plain and "](" not in plain


def test_credentials_never_reach_a_link():
    assert redact_uri("http://alice:s3cret@mlflow:5000/x") == "http://***@mlflow:5000/x"
    assert redact_uri("http://mlflow:5000") == "http://mlflow:5000"
    assert redact_uri("sqlite:///var/mlflow.db") == "sqlite:///var/mlflow.db"
    assert redact_uri("http://bob@mlflow:5000", mask=False) == "http://mlflow:5000"


def _ui_routes() -> str:
    """The MLflow UI's own bundle (installed with mlflow): where its page routes are defined."""
    (main,) = glob.glob(str(Path(mlflow.__file__).parent / "server/js/build/static/js/main.*.js"))
    return Path(main).read_text(encoding="utf-8", errors="replace")


def _registered(name: str, champion_run: str, new_run: str) -> None:
    client = MlflowClient()
    client.create_registered_model(name)
    for run_id in (champion_run, new_run):
        client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)


@pytest.fixture(scope="module")
def two_runs(prefect_server, tmp_path_factory):
    """Settings on a fresh MLflow store (one per module: its migrations take seconds) and two finished runs."""
    settings = load_settings(home=tmp_path_factory.mktemp("report"), mlflow_ui_url="https://alice:s3cret-pw@mlflow.example.org/?token=t0k3n")
    connection.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    ids = []
    for _ in range(2):
        with runs.run("report-links") as run_id:
            ids.append(run_id)
    return settings, ids


def test_the_published_report_links_the_run_version_and_compare_view(two_runs):
    """The report task with an MLflow UI address that carries a password and a token: the artifact
    stored on the Prefect server links the real run (its experiment id, from the store), the
    registered version and the compare view of the run beside the champion's, in the routes the
    installed MLflow UI serves, and holds neither secret."""
    settings, (champion_run, new_run) = two_runs
    experiment = MlflowClient().get_run(new_run).info.experiment_id
    _registered("report model", champion_run, new_run)
    decision = _decision(model_name="report model", version="2", promoted=True, reason="gain", run_id=new_run,
                         champion_before="1", champion_run_id=champion_run, champion_metrics={"few/grecall": 0.4})
    artifact_id = publish_report.fn(settings, {"few/grecall": 0.5}, decision, "snap1")
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[UUID(artifact_id)])))
    links = dict(re.findall(r"\[([^\]]+)\]\((https://[^)]+)\)", artifact.data))
    assert "s3cret-pw" not in artifact.data and "t0k3n" not in artifact.data
    base = "https://***@mlflow.example.org/?token=***#"
    assert links[f"run `{new_run}`"] == f"{base}/experiments/{experiment}/runs/{new_run}?workflowType=machine_learning"
    assert links["report model version 2"] == f"{base}/models/report%20model/versions/2"
    compare = urlsplit(links["this run beside champion v1's"].split("#", 1)[1])
    assert compare.path == "/compare-runs"
    query = parse_qs(compare.query)
    assert json.loads(unquote(query["runs"][0])) == [new_run, champion_run]
    assert json.loads(unquote(query["experiments"][0])) == [experiment]
    # what each link names exists in the store ...
    client = MlflowClient()
    assert client.get_model_version("report model", "2").run_id == new_run
    assert {client.get_run(r).info.experiment_id for r in (new_run, champion_run)} == {experiment}
    # ... and each route is one the installed MLflow UI serves (hash routes; the compare page parses these parameters)
    bundle = _ui_routes()
    for route in ('"/experiments/:experimentId/runs/:runUuid"', '"/models/:modelName/versions/:version"', '"/compare-runs"',
                  "?runs=${JSON.stringify(e)}&experiments=${JSON.stringify(t)}", "createHashRouter"):
        assert route in bundle, route


def test_without_a_champion_the_report_says_there_is_nothing_to_compare(two_runs):
    settings, (_, run_id) = two_runs
    connection.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    decision = _decision(model_name="m", version="1", promoted=True, reason="no champion yet", run_id=run_id,
                         champion_before=None, champion_run_id=None, champion_metrics={})
    artifact_id = publish_report.fn(settings, {"few/grecall": 0.5}, decision, "snap1")
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[UUID(artifact_id)])))
    assert "no earlier champion to compare with" in artifact.data and "compare-runs" not in artifact.data


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

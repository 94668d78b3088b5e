"""The retrain report (Prefect markdown artifact) and the MLflow link in it."""

from storage.links import redact_uri
from tasks.report import render_report


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

"""The retrain report (Prefect markdown artifact) and the MLflow link in it."""

from storage.links import redact_text, redact_uri
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
    assert redact_uri("http://bob@mlflow:5000", mask=False) == "http://mlflow:5000"


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

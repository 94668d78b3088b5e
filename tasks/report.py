"""Report task: the flow run's summary as a Prefect markdown artifact (DESIGN §2, issue 8)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from pogdiff.tables import bucket_pairs, fmt, markdown
from storage.mlflow import connection, runs
from storage.settings import Settings


def _table(metrics: dict[str, float], before: dict[str, float], new_label: str, before_label: str) -> list[str]:
    rows = [(bucket, name, fmt(value), fmt(old), fmt(None if old is None else value - old, "+.3f"))
            for bucket, name, value, old in bucket_pairs(metrics, before)]
    return markdown(["bucket", "metric", new_label, before_label, "delta"], rows, [False, False, True, True, True])


def _footer(snapshot_id: str, run_id: str, link: str | None) -> str:
    return f"Dataset snapshot `{snapshot_id}`. MLflow run `{run_id}`" + (f": [open in MLflow]({link})" if link else ".")


def render_report(metrics: dict[str, float], decision: dict, run_id: str, link: str | None, snapshot_id: str) -> str:
    """Markdown: the bucket × metric table (new model, champion before, delta), decision, where to look."""
    lines = [
        f"## Retrain: {decision['model_name']} version {decision['version']}",
        "",
        f"**Decision:** {'promoted to `champion`' if decision['promoted'] else 'stays `challenger`'} — {decision['reason']}",
        "",
        *_table(metrics, decision.get("champion_metrics") or {}, "new", "champion before"),
        "",
        _footer(snapshot_id, run_id, link),
    ]
    return "\n".join(lines) + "\n"


def render_evaluation(metrics: dict[str, float], target: dict, at_training: dict[str, float], run_id: str, link: str | None, snapshot_id: str) -> str:
    """Markdown: a registered version evaluated on today's data, beside what it scored when it was trained."""
    lines = [
        f"## Evaluation: {target['model']} version {target['version']}",
        "",
        *_table(metrics, at_training, "now", "at training"),
        "",
        _footer(snapshot_id, run_id, link),
    ]
    return "\n".join(lines) + "\n"


@task(name="report")
def publish_report(settings: Settings, metrics: dict[str, float], decision: dict, run_id: str, snapshot_id: str) -> str:
    """Creates the ``retrain-report`` markdown artifact; returns the artifact id."""
    connection.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    link = runs.run_link(settings.mlflow_ui_url, run_id)
    markdown = render_report(metrics, decision, run_id, link, snapshot_id)
    return str(create_markdown_artifact(markdown=markdown, key="retrain-report", description="bucket × metric table and promotion decision"))


@task(name="evaluation-report")
def publish_evaluation_report(settings: Settings, metrics: dict[str, float], target: dict, run_id: str, snapshot_id: str) -> str:
    """Creates the ``evaluation-report`` markdown artifact; returns the artifact id."""
    connection.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    link = runs.run_link(settings.mlflow_ui_url, run_id)
    markdown = render_evaluation(metrics, target, target["metrics"], run_id, link, snapshot_id)
    return str(create_markdown_artifact(markdown=markdown, key="evaluation-report", description="a registered version on today's data"))

"""Report task: the flow run's summary as a Prefect markdown artifact (DESIGN §2, issue 8)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from storage.mlflow import connection, runs
from storage.settings import Settings

BUCKETS = ("many", "medium", "few", "overall")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _table(metrics: dict[str, float], before: dict[str, float], new_label: str, before_label: str) -> list[str]:
    names = sorted({k.split("/", 1)[1] for k in metrics if "/" in k})
    lines = [f"| bucket | metric | {new_label} | {before_label} | delta |", "|---|---|---:|---:|---:|"]
    for bucket in BUCKETS:
        for name in names:
            key = f"{bucket}/{name}"
            if key in metrics:
                old = before.get(key)
                delta = None if old is None else metrics[key] - old
                sign = "" if delta is None or delta < 0 else "+"
                lines.append(f"| {bucket} | {name} | {_fmt(metrics[key])} | {_fmt(old)} | {sign}{_fmt(delta)} |")
    return lines


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

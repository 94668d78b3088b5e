"""Report task: the flow run's summary as a Prefect markdown artifact (DESIGN §2, issue 8)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from storage import tracking
from storage.links import mlflow_run_link
from storage.settings import Settings

BUCKETS = ("many", "medium", "few", "overall")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def render_report(metrics: dict[str, float], decision: dict, run_id: str, link: str | None, snapshot_id: str) -> str:
    """Markdown: the bucket × metric table (new model, champion before, delta), decision, where to look."""
    names = sorted({k.split("/", 1)[1] for k in metrics if "/" in k})
    before = decision.get("champion_metrics") or {}
    lines = [
        f"## Retrain: {decision['model_name']} version {decision['version']}",
        "",
        f"**Decision:** {'promoted to `champion`' if decision['promoted'] else 'stays `challenger`'} — {decision['reason']}",
        "",
        "| bucket | metric | new | champion before | delta |",
        "|---|---|---:|---:|---:|",
    ]
    for bucket in BUCKETS:
        for name in names:
            key = f"{bucket}/{name}"
            if key in metrics:
                old = before.get(key)
                delta = None if old is None else metrics[key] - old
                sign = "" if delta is None or delta < 0 else "+"
                lines.append(f"| {bucket} | {name} | {_fmt(metrics[key])} | {_fmt(old)} | {sign}{_fmt(delta)} |")
    lines += ["", f"Dataset snapshot `{snapshot_id}`. MLflow run `{run_id}`" + (f": [open in MLflow]({link})" if link else ".")]
    return "\n".join(lines) + "\n"


@task(name="report")
def publish_report(settings: Settings, metrics: dict[str, float], decision: dict, run_id: str, snapshot_id: str) -> str:
    """Creates the ``retrain-report`` markdown artifact; returns the artifact id."""
    tracking.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    link = mlflow_run_link(settings.mlflow_ui_url, run_id)
    markdown = render_report(metrics, decision, run_id, link, snapshot_id)
    return str(create_markdown_artifact(markdown=markdown, key="retrain-report", description="bucket × metric table and promotion decision"))

"""Report tasks: a flow run's summary as a Prefect markdown artifact (DESIGN §2, issue 8), with links
into the MLflow UI (the run, the registered version, the run beside the champion's) and the meaning
of every metric; and the bucket × metric table the MLflow descriptions share."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import task
from prefect.artifacts import create_markdown_artifact

from pogdiff.glossary import glossary_list
from pogdiff.tables import bucket_columns, markdown
from storage.mlflow import connection, descriptions, ui
from storage.settings import Settings

if TYPE_CHECKING:
    from tasks.results import FetchedModel, Registration


def bucket_table(metrics: dict[str, float], before: dict[str, float], before_label: str) -> list[str]:
    """Markdown lines of ``pogdiff.tables.bucket_columns``: a metric per row (↑ higher is better, ↓
    lower), a bucket per column, each cell the value and its delta against ``before``, whose own
    values follow in a ``↳ before_label`` row."""
    head, rows = bucket_columns(metrics, before, before_label)
    return markdown(head, rows, [False, *[True] * (len(head) - 1)])


def champion_label(decision: Registration) -> str:
    """What the comparison row of a retrain's table is: the champion the new version was gated against."""
    before = decision.champion_before
    return f"champion v{before}" if before and before != decision.version else "champion before"


def mlflow_links(ui_url: str | None, decision: Registration) -> dict[str, str | None]:
    """Links into the MLflow UI for a retrain's ``decision`` (``register_model``'s result): ``run``,
    ``version`` and ``compare`` (the run beside the champion's before it; None when there was none).
    All None without a UI address. Needs the tracking URI configured."""
    champion_run = decision.champion_run_id
    return {
        "run": ui.run_link(ui_url, decision.run_id),
        "version": ui.version_link(ui_url, decision.model_name, decision.version),
        "compare": ui.compare_link(ui_url, [decision.run_id, champion_run]) if champion_run else None,
    }


def _footer(snapshot_id: str, run_id: str, link: str | None) -> str:
    return f"Dataset snapshot `{snapshot_id}`. MLflow run `{run_id}`" + (f": [open in MLflow]({link})" if link else ".")


def _links(decision: Registration, links: dict[str, str | None]) -> str:
    name, version, before = decision.model_name, decision.version, decision.champion_before
    parts = [f"[run `{decision.run_id}`]({links['run']})" if links["run"] else f"run `{decision.run_id}`",
             f"[{name} version {version}]({links['version']})" if links["version"] else f"{name} version {version}"]
    if links["compare"]:
        parts.append(f"[this run beside champion v{before}'s]({links['compare']})")
    elif not before or before == version:
        parts.append("no earlier champion to compare with")
    hint = "" if links["run"] else " (set POGDIFF_MLFLOW_UI_URL for links)"
    return "**In MLflow:** " + " · ".join(parts) + hint


def render_report(metrics: dict[str, float], decision: Registration, links: dict[str, str | None], snapshot_id: str) -> str:
    """Markdown: decision, links into MLflow, the bucket × metric table (new model, champion before,
    delta), the dataset snapshot and the metrics glossary."""
    lines = [
        f"## Retrain: {decision.model_name} version {decision.version}",
        "",
        f"**Decision:** {'promoted to `champion`' if decision.promoted else 'stays `challenger`'} — {decision.reason}",
        "",
        _links(decision, links),
        "",
        *bucket_table(metrics, decision.champion_metrics, champion_label(decision)),
        "",
        f"Dataset snapshot `{snapshot_id}`.",
        "",
        "**Metrics** (↑ higher is better, ↓ lower is better)",
        "",
        glossary_list(metrics),
    ]
    return "\n".join(lines)


def render_evaluation(metrics: dict[str, float], target: FetchedModel, at_training: dict[str, float], run_id: str, link: str | None,
                      snapshot_id: str) -> str:
    """Markdown: a registered version evaluated on today's data, beside what it scored when it was trained."""
    lines = [
        f"## Evaluation: {target.model} version {target.version}",
        "",
        *bucket_table(metrics, at_training, "at training"),
        "",
        _footer(snapshot_id, run_id, link),
        "",
        "**Metrics** (↑ higher is better, ↓ lower is better)",
        "",
        glossary_list(metrics),
    ]
    return "\n".join(lines)


@task(name="report")
def publish_report(settings: Settings, metrics: dict[str, float], decision: Registration, snapshot_id: str) -> str:
    """Creates the ``retrain-report`` markdown artifact; returns the artifact id."""
    connection.use(settings)
    markdown = render_report(metrics, decision, mlflow_links(settings.mlflow_ui_url, decision), snapshot_id)
    return str(create_markdown_artifact(markdown=markdown, key="retrain-report", description="bucket × metric table and promotion decision"))


@task(name="evaluation-report")
def publish_evaluation_report(settings: Settings, metrics: dict[str, float], target: FetchedModel, run_id: str, snapshot_id: str) -> str:
    """Creates the ``evaluation-report`` markdown artifact and writes the same text as the evaluation
    run's MLflow description; returns the artifact id."""
    connection.use(settings)
    link = ui.run_link(settings.mlflow_ui_url, run_id)
    markdown = render_evaluation(metrics, target, target.metrics, run_id, link, snapshot_id)
    # the same text is the evaluation run's description: the reviewer who opens the run in MLflow reads it first
    descriptions.set_run_description(run_id, markdown + "\n\nSide by side, grids included: the run's `compare.html`.")
    return str(create_markdown_artifact(markdown=markdown, key="evaluation-report", description="a registered version on today's data"))

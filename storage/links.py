"""Links a reviewer can click (an MLflow run in the MLflow UI), with credentials removed."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from mlflow.tracking import MlflowClient


def redact_uri(uri: str) -> str:
    """``scheme://user:secret@host/path`` → ``scheme://***@host/path``; other strings unchanged."""
    parts = urlsplit(uri)
    if not parts.netloc or "@" not in parts.netloc:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def mlflow_run_link(ui_url: str | None, run_id: str) -> str | None:
    """``<ui>/#/experiments/<experiment id>/runs/<run id>``, or ``None`` when no UI address is known.

    Needs the tracking URI configured (``storage.tracking.configure``). Credentials in ``ui_url``
    never reach the link: it ends up in Prefect artifacts that every user of the server can read.
    """
    if not ui_url:
        return None
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    return f"{redact_uri(ui_url).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

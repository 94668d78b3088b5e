"""Addresses of pages of the MLflow UI: a run, a registered model version, runs side by side.

The UI routes by the URL fragment (``<ui>/#/experiments/1/runs/<id>``), after any query string of
the UI address. Credentials in the UI address never reach a link: links end up in Prefect
artifacts and MLflow descriptions that every user of those servers can read. Every function
returns ``None`` when no UI address is configured (``Settings.mlflow_ui_url``).
"""

from __future__ import annotations

import json
from urllib.parse import quote, urlsplit, urlunsplit

from mlflow.tracking import MlflowClient

from storage.links import redact_uri


# MLflow 3's UI shows an experiment and its runs in the view this query parameter names, else in the
# one the browser last used, GenAI (traces, token usage) on a first visit; the experiment's
# mlflow.experimentKind tag is not consulted while the UI has its GenAI / Model training switch.
TRAINING_VIEW = "workflowType=machine_learning"


def _page(ui_url: str, route: str) -> str:
    parts = urlsplit(redact_uri(ui_url))
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/", fragment=route))


def run_link(ui_url: str | None, run_id: str) -> str | None:
    """``<ui>/#/experiments/<experiment id>/runs/<run id>?workflowType=machine_learning``. Needs the tracking URI configured
    (``connection.use``): the experiment id comes from the store."""
    if not ui_url:
        return None
    experiment = MlflowClient().get_run(run_id).info.experiment_id
    return _page(ui_url, f"/experiments/{experiment}/runs/{run_id}?{TRAINING_VIEW}")


def experiment_link(ui_url: str | None, experiment_id: str) -> str | None:
    """``<ui>/#/experiments/<id>?workflowType=machine_learning``: the runs table."""
    if not ui_url:
        return None
    return _page(ui_url, f"/experiments/{experiment_id}?{TRAINING_VIEW}")


def version_link(ui_url: str | None, model_name: str, version: str) -> str | None:
    """``<ui>/#/models/<name>/versions/<version>`` (the name percent-encoded)."""
    if not ui_url:
        return None
    return _page(ui_url, f"/models/{quote(model_name, safe='')}/versions/{version}")


def compare_link(ui_url: str | None, run_ids: list[str]) -> str | None:
    """``<ui>/#/compare-runs?runs=[...]&experiments=[...]``: the runs side by side (params, metrics,
    tags), as the UI's own "Compare" button opens them. Needs the tracking URI configured."""
    if not ui_url:
        return None
    client = MlflowClient()
    experiments = sorted({client.get_run(r).info.experiment_id for r in run_ids})
    query = f"runs={quote(json.dumps(list(run_ids)), safe='')}&experiments={quote(json.dumps(experiments), safe='')}"
    return _page(ui_url, f"/compare-runs?{query}")

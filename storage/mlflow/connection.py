"""Where MLflow is: the tracking and registry URI, its credentials, the server check, and where
each experiment keeps its artifacts.

A flow's first MLflow task points the process at the store with ``use(settings)``; the other
modules of this package then work on that store, and later tasks find it configured. ``use`` is a
no-op when the process already points there, so a task placed on another worker process (Dask,
process pool) configures that process once, and the flow's own process is configured once per flow.
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import logging
import os
import re
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

from storage.links import has_scheme, redact_text, redact_uri
from storage.settings import Settings

_artifact_root: str | None = None
# (tracking URI as given, artifact root as given, URI MLflow was pointed at): what ``use`` compares
_configured: tuple[str, str | None, str] | None = None


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def configure(tracking_uri: str, artifact_root: str | None = None) -> None:
    """Point tracking and the model registry at ``tracking_uri`` (e.g. ``sqlite:///var/mlflow.db``).

    ``artifact_root`` (a local folder or a URI such as ``s3://bucket/mlflow``) is where experiments
    created by ``experiment_id`` keep their artifacts, one sub-folder per experiment; ``None`` leaves
    MLflow's default (the server's artifact root, or ``./mlruns`` for a local database). With an HTTP
    tracking server a local folder is ignored: artifacts on one client's disk would be unreachable
    for everyone else, so the server's own store (``--artifacts-destination``) keeps them.
    """
    global _artifact_root, _configured
    given = (tracking_uri, artifact_root)
    # every task's resume starts and stops a system-metrics monitor; its INFO lines are noise
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    tracking_uri = _move_credentials(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    if artifact_root is not None and _is_server(tracking_uri) and not has_scheme(artifact_root):
        artifact_root = None
    if artifact_root is not None and redact_uri(artifact_root) != artifact_root:
        # MLflow stores the root in every experiment's location, which every reader of the server sees
        raise ValueError(
            f"artifact root {redact_uri(artifact_root)} carries credentials; MLflow would store them as the "
            "experiment's location for every reader to see: give them to the store through its own environment "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_CONNECTION_STRING, "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) and drop them from the URI"
        )
    _artifact_root = artifact_root
    _configured = (*given, tracking_uri)


def use(settings: Settings) -> None:
    """``configure`` with the settings' MLflow location, unless this process already points there.

    Something else may have moved MLflow since (a library call, a test pointing at another store) or
    dropped the credentials ``configure`` moved to the environment; then it configures again.
    """
    uri, root = settings.mlflow_tracking_uri, settings.mlflow_artifact_root
    if _configured is not None and _configured[:2] == (uri, root) and _in_place(uri, _configured[2]):
        return
    configure(uri, root)


def connect(settings: Settings) -> None:
    """``use(settings)``, MLflow's HTTP retries bounded by ``settings.store_retries`` (unless
    MLFLOW_HTTP_REQUEST_MAX_RETRIES is set), and the tracking server's health checked within
    ``settings.store_timeout_s``: for the commands, so a server that is down is one line naming it
    in seconds, not minutes of MLflow's own retries ending in a traceback."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.store_retries))
    use(settings)
    check_server(settings.store_timeout_s)


def _in_place(given: str, pointed: str) -> bool:
    if mlflow.get_tracking_uri() != pointed or mlflow.get_registry_uri() != pointed:
        return False
    if not _is_server(given):
        return True
    parts = urlsplit(given)
    return all(value is None or os.environ.get(name) == unquote(value)
               for name, value in (("MLFLOW_TRACKING_USERNAME", parts.username), ("MLFLOW_TRACKING_PASSWORD", parts.password)))


def _move_credentials(uri: str) -> str:
    """``http(s)://user:secret@host`` -> ``http(s)://host``, the credentials moved to MLflow's own
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (basic auth, the same request).

    MLflow writes its tracking URI into error messages ("API request to ... failed") and run links
    ("View run ... at"); without the credentials in it, none of them can leak the password.
    """
    parts = urlsplit(uri)
    if not _is_server(uri) or parts.username is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return redact_uri(uri, mask=False)


class TrackingUnavailable(ConnectionError):
    """The MLflow tracking server does not answer; the message names it (credentials removed)."""


def check_server(timeout: float = 10.0) -> None:
    """For an HTTP tracking URI, ``GET <uri>/health`` once; raise ``TrackingUnavailable`` when the
    server does not answer. Call it before a run is opened, so a server that is down fails one
    task, retried by Prefect, with one clear message instead of MLflow's nested retries."""
    uri = mlflow.get_tracking_uri()
    if not _is_server(uri):
        return
    request = urllib.request.Request(f"{uri.rstrip('/')}/health")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user is not None:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except (OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise TrackingUnavailable(f"MLflow tracking server {redact_uri(uri)} is unreachable: {redact_text(str(reason))}") from None


def system_metrics_enabled() -> bool:
    """Whether runs sample CPU/GPU/memory/disk as ``system/*`` metrics.

    On when psutil is importable (MLflow needs it; GPU metrics also need pynvml), unless
    ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` says otherwise. Never an error when psutil is missing.
    """
    if importlib.util.find_spec("psutil") is None:
        return False
    setting = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    return True if setting is None else setting.strip().lower() in ("true", "1")


def _artifact_location(experiment: str) -> str | None:
    if _artifact_root is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    if has_scheme(_artifact_root):
        return f"{_artifact_root.rstrip('/')}/{folder}"
    return (Path(_artifact_root).expanduser().resolve() / folder).as_uri()


# MLflow 3's UI opens an experiment on the view its kind names; without the tag it may guess the GenAI
# view (traces, token usage), empty here. This is the model-training kind: it opens on the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def experiment_id(name: str) -> str:
    """Id of experiment ``name``, created (with its artifact location and the model-training kind)
    when missing; an existing experiment without the kind gets it."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "active" and exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(name),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as err:
            # another process created it between the lookup and the create
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise ValueError(
            f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore) "
            "or permanently delete it (mlflow gc) before logging to that name"
        )
    return exp.experiment_id


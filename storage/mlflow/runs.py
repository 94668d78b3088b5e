"""MLflow runs: open, resume and close them, and log into the active one (tags, the resolved config
as params, metrics, artifacts); find the runs a crash left behind.

Everything works on run ids, or on the active run of the current thread (opened with ``run`` or
``resume``), so callers never hold an MLflow client.
"""

from __future__ import annotations

import getpass
import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus, SourceType
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH  # limits MLflow enforces
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from storage.mlflow.connection import experiment_id, system_metrics_enabled

CONFIG_ARTIFACT = "config.json"
_RUN_ID = re.compile(r"[0-9a-f]{32}")


def is_run_id(value: object) -> bool:
    """Whether ``value`` looks like an MLflow run id: 32 lowercase hex digits."""
    return isinstance(value, str) and _RUN_ID.fullmatch(value) is not None


@contextmanager
def run(experiment: str, run_name: str | None = None, tags: dict[str, str] | None = None) -> Iterator[str]:
    """Start a run in ``experiment`` (created if missing) and yield its run id.

    The run ends FINISHED when the block completes, FAILED when it raises (KILLED on Ctrl-C); the
    exception is re-raised. Only one run may be active per thread (no nesting).
    """
    exp_id = experiment_id(experiment)
    active = mlflow.start_run(
        experiment_id=exp_id, run_name=run_name, tags=tags, log_system_metrics=system_metrics_enabled()
    )
    try:
        yield active.info.run_id
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def start(experiment: str, run_name: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Create a run that outlives this call (a flow spans several tasks); returns its id.

    Pair with ``resume`` to log into it and ``end`` to close it.
    """
    exp_id = experiment_id(experiment)
    return MlflowClient().create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id


@contextmanager
def resume(run_id: str) -> Iterator[str]:
    """Make ``run_id`` the active run of this thread for the block; the run stays open afterwards.

    System metrics (``system_metrics_enabled``) are sampled while the block runs, continuing the
    run's ``system/*`` step count, so the training and evaluation tasks show their resource use.
    """
    mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics_enabled())
    try:
        yield run_id
    finally:
        # Leave the status RUNNING: only ``end`` decides how the run finished.
        mlflow.end_run(RunStatus.to_string(RunStatus.RUNNING))


def source_tags(entrypoint: str, commit: str | None) -> dict[str, str]:
    """MLflow's own tags for what ran a run, shown as "Source", "Created by" and the commit chip of
    the run page: ``entrypoint`` (e.g. ``flows/retrain.py:retrain``) as a job, the OS user, and the
    git commit (left out when ``None``: not a git checkout)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        user = "unknown"
    tags = {MLFLOW_SOURCE_NAME: entrypoint, MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.JOB), MLFLOW_USER: user}
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def end(run_id: str, status: str = "FINISHED") -> None:
    """Close a run created by ``start`` with FINISHED, FAILED or KILLED."""
    MlflowClient().set_terminated(run_id, status=status)


def unfinished_runs(experiment: str, status: str = "RUNNING") -> list[tuple[str, dict[str, str]]]:
    """``(run_id, tags)`` of every run of ``experiment`` with ``status``, newest first.

    After a crash (a killed process never calls ``end``) its run stays RUNNING; the next retrain
    finds it here. A run stopped on purpose so that it can continue (the training time limit) is
    KILLED with the tag ``resumable=true``. An unknown experiment has none.
    """
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    out, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], f"attributes.status = '{RunStatus.to_string(RunStatus.from_string(status))}'",
                                  order_by=["attributes.start_time DESC"], page_token=token)
        out.extend((r.info.run_id, dict(r.data.tags)) for r in page)
        token = page.token
        if not token:
            return out


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    """Set (or overwrite) tags of a run, active or not."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def run_dir(runs_dir: str | Path, run_id: str) -> Path:
    """``<runs_dir>/<run_id>``, the folder of one run's checkpoints and model.

    ``run_id`` must look like an MLflow run id (32 lowercase hex digits), so no id can name a
    folder outside ``runs_dir`` (``..``, an absolute path, a separator).
    """
    if not is_run_id(run_id):
        raise ValueError(f"not an MLflow run id: {run_id!r} (expected 32 hex digits)")
    return Path(runs_dir) / run_id


def run_params(run_id: str) -> dict[str, str]:
    """The params of a run (the flattened resolved config, ``flatten``'s keys)."""
    return dict(MlflowClient().get_run(run_id).data.params)


def run_tags(run_id: str) -> dict[str, str]:
    return dict(MlflowClient().get_run(run_id).data.tags)


def log_artifacts(local_dir: Path, artifact_path: str | None = None) -> None:
    require_run("log_artifacts")
    mlflow.log_artifacts(str(local_dir), artifact_path)


def log_text(text: str, artifact_file: str) -> None:
    """Write ``text`` as the artifact ``artifact_file`` (e.g. ``notes/summary.md``) of the active run."""
    require_run("log_text")
    mlflow.log_text(text, artifact_file)


def require_run(what: str) -> None:
    """Raise ``RuntimeError`` naming ``what`` when this thread has no active run."""
    # MLflow's fluent calls silently start a new run (in the Default experiment) when none is
    # active, e.g. in a Prefect worker thread: the active run is per thread.
    if mlflow.active_run() is None:
        raise RuntimeError(f"{what} must be called inside runs.run(...) or runs.resume(...) (no active MLflow run in this thread)")


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def flatten(cfg: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested pydantic models / mappings -> ``{"train.pog.lam": "1.0", ...}``.

    Values become strings (``str`` for scalars, JSON for lists, ``"{}"`` for an empty mapping), as
    MLflow params are strings. Keys are joined with ``.`` under ``prefix``.
    """
    data = to_jsonable_python(cfg)
    if not isinstance(data, dict):
        raise TypeError(f"flatten needs a pydantic model or a mapping, got {type(cfg).__name__}")
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        elif isinstance(value, dict):
            out[name] = "{}"
        else:
            out[name] = _param_value(value)
    return out


def log_config(cfg: BaseModel | Mapping[str, Any]) -> None:
    """Log the resolved config to the active run: flattened as params, in full as ``config.json``.

    Params are sent in batches of MLflow's per-request limit. A value longer than MLflow's param
    limit is cut (the artifact keeps it whole). Call it once per run: logging a different value
    for an already logged key raises (MLflow params are immutable), and a second call replaces
    ``config.json``.
    """
    require_run("log_config")
    params = flatten(cfg)
    for key, value in params.items():
        if len(value) > MAX_PARAM_VAL_LENGTH:
            suffix = f"... (truncated, see {CONFIG_ARTIFACT})"
            params[key] = value[: MAX_PARAM_VAL_LENGTH - len(suffix)] + suffix
    items = sorted(params.items())
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        mlflow.log_params(dict(items[start : start + MAX_PARAMS_TAGS_PER_BATCH]))
    mlflow.log_dict(to_jsonable_python(cfg), CONFIG_ARTIFACT)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log metrics to the active run; every value must be a finite number.

    None, NaN and +-inf raise ``ValueError`` naming the key: a NaN loss or metric means something
    upstream broke, and MLflow would store it silently (inf is stored as the largest float).
    """
    require_run("log_metrics")
    clean = finite_metrics(metrics)
    if clean:
        mlflow.log_metrics(clean, step=step)


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` as floats; ``ValueError`` naming the key for None, a non-number, NaN or +-inf."""
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {key!r} is not a number: {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"metric {key!r} is {number} (must be finite)")
        clean[key] = number
    return clean

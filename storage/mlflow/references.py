"""What a reviewer names (a run id or a registered model version): its run, its metrics, and for a
model version a local copy of the model.

Read-only MLflow lookups for ``pogdiff compare`` and the evaluation of a registered model. A
reference is one of

- an MLflow run id (32 hex characters);
- ``name@alias`` or ``name/version`` (a ``models:/`` prefix is allowed), e.g. ``pogdiff-demo@champion``;
- a bare alias such as ``champion`` or ``challenger``, looked up on ``default_model``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from storage.errors import RunNotFound
from storage.mlflow.registry import model_version
from storage.mlflow.runs import is_run_id


@dataclass(frozen=True)
class ResolvedRun:
    """A reference, the run it stands for, and that run's latest metric values."""

    ref: str
    run_id: str
    model: str | None = None  # registered model name, when the reference named a model version
    version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def _named_version(client: MlflowClient, ref: str, name: str, alias: str | None, version: str | None):
    try:
        return model_version(client, name, version, alias)
    except MlflowException as err:
        raise RunNotFound(f"cannot resolve {ref!r}: {err.message}") from None


def resolve_run(tracking_uri: str, ref: str, default_model: str) -> ResolvedRun:
    """Resolve ``ref`` against the store at ``tracking_uri`` (also the registry); see the module doc.

    Raises ``RunNotFound`` naming the reference when no run, model, alias or version matches, or
    when the model version was not logged from a run.
    """
    ref = ref.strip()
    if not ref:
        raise RunNotFound("empty reference: give a run id, an alias (champion), name@alias or name/version")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    body = ref.removeprefix("models:/")
    model = version = None
    if body == ref and is_run_id(ref):
        run_id = ref
    else:
        if "@" in body:
            name, alias = body.rsplit("@", 1)
            mv = _named_version(client, ref, name, alias, None)
        elif "/" in body:
            name, number = body.rsplit("/", 1)
            if not number.isdigit():
                raise RunNotFound(f"cannot resolve {ref!r}: the version after '/' must be a number")
            mv = _named_version(client, ref, name, None, number)
        else:
            name = default_model
            mv = _named_version(client, ref, name, body, None)
        if not mv.run_id:
            raise RunNotFound(f"{ref!r} is {name} version {mv.version}, which was not logged from a run")
        run_id, model, version = mv.run_id, name, str(mv.version)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise RunNotFound(f"cannot resolve {ref!r}: {err.message}") from None
    return ResolvedRun(ref=ref, run_id=run_id, model=model, version=version, metrics=dict(run.data.metrics))


def materialize(tracking_uri: str, ref: str, default_model: str, dest_root: Path) -> dict:
    """Load ``ref`` (``champion``, ``name@alias``, ``name/version``) and save it as a model folder.

    Goes through the logged pyfunc model, so a LoRA version is rebuilt from its base and adapter
    exactly as any user of the registry would get it. The folder is
    ``dest_root/<name>-v<version>/model``, written once and reused (a version never changes).
    Returns ``{"model_dir", "model", "version", "run_id", "metrics"}`` (the metrics its training run logged).
    """
    found = resolve_run(tracking_uri, ref, default_model)
    if found.version is None:
        raise ValueError(f"{ref!r} names a run, not a registered model version")
    target = Path(dest_root) / f"{found.model}-v{found.version}" / "model"
    if not target.is_dir():
        mlflow.set_tracking_uri(tracking_uri)
        pipe = mlflow.pyfunc.load_model(f"models:/{found.model}/{found.version}").unwrap_python_model().pipeline
        pipe.to("cpu")
        if target.parent.exists():
            shutil.rmtree(target.parent)  # a half-written earlier attempt
        pipe.save_pretrained(target)  # atomic: the folder appears complete or not at all
    return {"model_dir": str(target), "model": found.model, "version": found.version, "run_id": found.run_id,
            "metrics": dict(found.metrics)}

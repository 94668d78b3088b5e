"""What a reviewer names (a run id or a registered model version): its run, its metrics, and for a
model version a local copy of the model.

Read-only MLflow lookups for ``pogdiff compare`` and the evaluation of a registered model. A
reference is one of

- an MLflow run id (32 hex characters);
- ``name@alias`` or ``name/version`` (a ``models:/`` prefix is allowed), e.g. ``pogdiff-demo@champion``;
- a bare alias such as ``champion`` or ``challenger``, or a bare version number, on ``default_model``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from storage.errors import RunNotFound
from storage.mlflow.registry import is_missing, model_version
from storage.mlflow.runs import is_run_id


@dataclass(frozen=True)
class ResolvedRun:
    """A reference, the run it stands for, and that run's latest metric values."""

    ref: str
    run_id: str
    model: str | None = None  # registered model name, when the reference named a model version
    version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def parse_reference(ref: str, default_model: str) -> tuple[str, str | None, str | None]:
    """``(model name, version, alias)`` of a model reference: ``7``, ``champion``, ``NAME@alias``,
    ``NAME/7`` (a ``models:/`` prefix is allowed); a bare number or alias is on ``default_model``.
    Raises ``RunNotFound`` for an empty reference or a version that is not a number."""
    ref = ref.strip()
    if not ref:
        raise RunNotFound("empty reference: give a run id, an alias (champion), name@alias or name/version")
    body = ref.removeprefix("models:/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        return name, None, alias
    if "/" in body:
        name, number = body.rsplit("/", 1)
        if not number.isdigit():
            raise RunNotFound(f"cannot resolve {ref!r}: the version after '/' must be a number")
        return name, number, None
    return (default_model, body, None) if body.isdigit() else (default_model, None, body)


def _missing(client: MlflowClient, name: str, version: str | None, alias: str | None, err: MlflowException) -> str | None:
    """What does not exist, in the words every command uses; ``None`` when all of it exists (then
    ``err``, the lookup's failure, was something else)."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as lookup:
        if not is_missing(lookup):
            raise
        return f"no registered model named {name!r}"
    if alias is not None:
        return None if alias in model.aliases else f"registered model {name!r} has no alias {alias!r}"
    return f"registered model {name!r} has no version {version!r}" if is_missing(err) else None


def resolve_version(ref: str, default_model: str, client: MlflowClient | None = None):
    """``(model name, version)`` that a model reference (see ``parse_reference``) names in the
    registry; ``RunNotFound`` naming the missing model, version or alias."""
    name, mv = _model_version(client or MlflowClient(), ref, default_model)
    return name, str(mv.version)


def _model_version(client: MlflowClient, ref: str, default_model: str):
    """``(model name, its ModelVersion)`` for ``resolve_version``, looked up once."""
    name, version, alias = parse_reference(ref, default_model)
    try:
        mv = model_version(client, name, version, alias)
    except MlflowException as err:
        missing = _missing(client, name, version, alias, err)
        if missing is None:
            raise
        raise RunNotFound(f"cannot resolve {ref.strip()!r}: {missing}") from None
    return name, mv


def resolve_run(tracking_uri: str, ref: str, default_model: str) -> ResolvedRun:
    """Resolve ``ref`` against the store at ``tracking_uri`` (also the registry); see the module doc.

    Raises ``RunNotFound`` naming the reference when no run, model, alias or version matches, or
    when the model version was not logged from a run.
    """
    ref = ref.strip()
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    model = version = None
    if is_run_id(ref):
        run_id = ref
    else:
        name, mv = _model_version(client, ref, default_model)
        number = str(mv.version)
        if not mv.run_id:
            raise RunNotFound(f"{ref!r} is {name} version {mv.version}, which was not logged from a run")
        run_id, model, version = mv.run_id, name, number
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

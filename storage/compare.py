"""Resolve what a reviewer names (a run id or a registered model version) to its run and metrics.

Read-only MLflow lookups for ``pogdiff compare``. A reference is one of

- an MLflow run id (32 hex characters);
- ``name@alias`` or ``name/version`` (a ``models:/`` prefix is allowed), e.g. ``pogdiff-demo@champion``;
- a bare alias such as ``champion`` or ``challenger``, looked up on ``default_model``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from storage.errors import RunNotFound

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class ResolvedRun:
    """A reference, the run it stands for, and that run's latest metric values."""

    ref: str
    run_id: str
    model: str | None = None  # registered model name, when the reference named a model version
    version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def _model_version(client: MlflowClient, ref: str, name: str, alias: str | None, version: str | None):
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
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
    if body == ref and _RUN_ID.match(ref):
        run_id = ref
    else:
        if "@" in body:
            name, alias = body.rsplit("@", 1)
            mv = _model_version(client, ref, name, alias, None)
        elif "/" in body:
            name, number = body.rsplit("/", 1)
            if not number.isdigit():
                raise RunNotFound(f"cannot resolve {ref!r}: the version after '/' must be a number")
            mv = _model_version(client, ref, name, None, number)
        else:
            name = default_model
            mv = _model_version(client, ref, name, body, None)
        if not mv.run_id:
            raise RunNotFound(f"{ref!r} is {name} version {mv.version}, which was not logged from a run")
        run_id, model, version = mv.run_id, name, str(mv.version)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise RunNotFound(f"cannot resolve {ref!r}: {err.message}") from None
    return ResolvedRun(ref=ref, run_id=run_id, model=model, version=version, metrics=dict(run.data.metrics))

"""The model registry: the champion and challenger aliases, promotion by the gate or by a reviewer,
and the versions of a registered model with their decisions.

Promotion uses aliases and tags (MLflow deprecated stages): every new version gets the alias
``challenger``; it also gets ``champion`` when the gate passes (``storage.gate.decide``) or a
reviewer promotes it by hand (``promote_manually``). The decision and the numbers it used are
written onto the model version as ``gate.*`` / ``promoted_*`` tags, so a reviewer sees in the
registry why a version was or was not promoted.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from storage.config import GateConfig
from storage.gate import PromotionDecision, decide, gate_tags

CHAMPION = "champion"
CHALLENGER = "challenger"
MANUAL_USER_UNKNOWN = "unknown"


def is_missing(err: MlflowException) -> bool:
    return err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def model_version(client: MlflowClient, model_name: str, version: str | None = None, alias: str | None = None):
    """Version ``version`` of ``model_name``, or the version ``alias`` points at; MLflow's error
    (``MlflowException``) when there is none, for the caller to word."""
    if alias is not None:
        return client.get_model_version_by_alias(model_name, alias)
    return client.get_model_version(model_name, str(version))


def _require_version(client: MlflowClient, model_name: str, version: str) -> None:
    """``LookupError`` naming the version when ``model_name`` has no ``version``."""
    try:
        model_version(client, model_name, version)
    except MlflowException as err:
        if is_missing(err):
            raise LookupError(f"registered model {model_name!r} has no version {version!r}") from None
        raise


def _run_metrics(client: MlflowClient, run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    return dict(client.get_run(run_id).data.metrics)


def champion(model_name: str) -> tuple[str, dict[str, float]] | None:
    """``(version, latest metrics of the run that logged it)`` of the champion, or ``None``.

    ``None`` when the registered model does not exist or has no ``champion`` alias.
    """
    client = MlflowClient()
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as err:
        if is_missing(err):
            return None
        raise
    version = model.aliases.get(CHAMPION)
    if version is None:
        return None
    mv = model_version(client, model_name, version)
    return str(mv.version), _run_metrics(client, mv.run_id)


def _now() -> str:
    # microseconds: promotions are ordered by this stamp (``_settle_champion``)
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _settle_champion(client: MlflowClient, model_name: str) -> str | None:
    """Point ``champion`` at the version with the latest recorded promotion (``promoted_at``, then
    the higher version number on a tie); returns it.

    Called after every alias move. Two promotions racing (the nightly gate and a reviewer) can set
    the alias in either order; each re-reads every recorded decision after its own move, and the
    one that settles last sets the alias to the latest decision, so the champion is the one the
    later decision chose whatever the order of the alias writes. Both decisions stay recorded on
    their versions. Stamps come from the deciding machines' clocks (keep them synchronised).
    """
    decided = [(mv.tags["promoted_at"], int(mv.version)) for mv in _search_versions(client, f"name = {_quoted(model_name)}")
               if mv.tags.get("promoted_at")]
    if not decided:
        return None
    latest = str(max(decided)[1])
    if str(client.get_registered_model(model_name).aliases.get(CHAMPION)) != latest:
        client.set_registered_model_alias(model_name, CHAMPION, latest)
    return latest


def promote(model_name: str, version: str, new_metrics: Mapping[str, float], gate: GateConfig) -> PromotionDecision:
    """Apply the promotion gate (``decide``) to ``version`` of ``model_name`` against the current champion.

    The version always becomes ``challenger``; it becomes ``champion`` only when the gate passes, so
    a model that is worse by the gate's measure never holds ``champion``. The decision and every
    number it used are written onto the version first (``gate.decision`` promoted|rejected,
    ``gate.reason``, ``gate.champion_version``, ``gate.config``, and per compared metric
    ``gate.<metric>.{role,new,champion,change,limit,status}``), then the aliases move; a promoted
    version also gets ``promoted_by=gate`` and ``promoted_at``. Re-running it on the champion
    changes nothing (``"already champion"``). A promotion racing this one (a reviewer's, or another
    gate) cannot leave the older decision as champion (``_settle_champion``); a gate racing a gate
    compares against the champion it read.
    """
    version = str(version)
    client = MlflowClient()
    _require_version(client, model_name, version)  # fail early, naming the version, on a bad one
    current = champion(model_name)
    champion_before = current[0] if current else None
    if champion_before == version:
        client.set_registered_model_alias(model_name, CHALLENGER, version)
        return PromotionDecision(promoted=True, version=version, champion_before=version, decided_by="gate", reason="already champion")
    result = decide(gate, new_metrics, current[1] if current else None, champion_before)
    tags = gate_tags(gate, result, champion_before)
    if result.promoted:
        tags.update({"promoted_by": "gate", "promoted_at": _now()})
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    if result.promoted:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        _settle_champion(client, model_name)
    return PromotionDecision(promoted=result.promoted, version=version, champion_before=champion_before,
                             decided_by="gate", reason=result.reason, checks=result.checks)


def promote_manually(model_name: str, version: str, user: str | None, reason: str | None = None) -> PromotionDecision:
    """A reviewer's promotion of ``version`` to ``champion``, whatever the gate decided.

    Recorded on the version as ``promoted_by=manual``, ``promoted_by_user`` (``user``, or
    ``"unknown"``), ``promoted_at`` (UTC, ISO 8601), ``promotion_reason`` and
    ``promotion_champion_before``; the gate's own ``gate.*`` tags are kept as they were, and
    ``challenger`` does not move. Promoting the champion changes nothing.
    """
    version = str(version)
    client = MlflowClient()
    _require_version(client, model_name, version)
    current = champion(model_name)
    champion_before = current[0] if current else None
    if champion_before == version:
        return PromotionDecision(promoted=True, version=version, champion_before=version, decided_by="manual", reason="already champion")
    text = reason or "promoted by hand"
    tags = {
        "promoted_by": "manual",
        "promoted_by_user": user or MANUAL_USER_UNKNOWN,
        "promoted_at": _now(),
        "promotion_reason": text,
        "promotion_champion_before": champion_before or "none",
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    client.set_registered_model_alias(model_name, CHAMPION, version)
    _settle_champion(client, model_name)
    return PromotionDecision(promoted=True, version=version, champion_before=champion_before, decided_by="manual", reason=text)


def _quoted(model_name: str) -> str:
    # the filter parser has no escapes: quote with the quote character the name does not contain
    quote = '"' if "'" in model_name else "'"
    if quote in model_name:
        raise ValueError(f"model name {model_name!r} holds both quote characters; MLflow cannot search it")
    return f"{quote}{model_name}{quote}"


def _search_versions(client: MlflowClient, filter_string: str) -> list:
    versions, token = [], None
    while True:
        page = client.search_model_versions(filter_string, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


def version_of_run(model_name: str, run_id: str) -> str | None:
    """The version of ``model_name`` that ``run_id`` registered (the lowest, if several), or ``None``.

    Lets a retried register task reuse the version its first attempt created.
    """
    found = _search_versions(MlflowClient(), f"name = {_quoted(model_name)} and run_id = '{run_id}'")
    return str(min(int(mv.version) for mv in found)) if found else None


def version_run_id(model_name: str, version: str) -> str | None:
    """The run that logged ``version`` of ``model_name`` (None for a version registered from outside a run)."""
    return model_version(MlflowClient(), model_name, version).run_id or None



def _is_key_metric(name: str) -> bool:
    # evaluation metrics are "<bucket>/<metric>"; per-step training, system and input-size metrics are not
    return "/" in name and not name.startswith(("train/", "system/", "data/"))


def list_versions(model_name: str) -> list[dict[str, Any]]:
    """Every version of ``model_name``, newest first.

    Each entry: ``version``, ``aliases`` (sorted list), ``run_id``, ``created`` (UTC, ISO 8601),
    ``gate`` (``decision`` and ``reason``, ``None`` when the gate never ran), ``promoted_by``
    (``gate`` | ``manual`` | ``None``), ``promoted_by_user``, ``promoted_at``, ``weights``
    (``full`` | ``lora``) and ``metrics`` (the run's evaluation metrics ``<bucket>/<metric>``).
    An unknown model has no versions: ``[]``.
    """
    client = MlflowClient()
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as err:
        if is_missing(err):
            return []
        raise
    # search results may come without aliases; the registered model carries them all
    aliases: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    versions = _search_versions(client, f"name = {_quoted(model_name)}")
    versions.sort(key=lambda mv: int(mv.version), reverse=True)
    out = []
    for mv in versions:
        metrics = _run_metrics(client, mv.run_id)
        out.append(
            {
                "version": str(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "run_id": mv.run_id,
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).isoformat(timespec="seconds"),
                "gate": {"decision": mv.tags["gate.decision"], "reason": mv.tags.get("gate.reason")}
                if "gate.decision" in mv.tags
                else None,
                "promoted_by": mv.tags.get("promoted_by"),
                "promoted_by_user": mv.tags.get("promoted_by_user"),
                "promoted_at": mv.tags.get("promoted_at"),
                "weights": mv.tags.get("weights"),
                "metrics": {k: metrics[k] for k in sorted(metrics) if _is_key_metric(k)},
            }
        )
    return out

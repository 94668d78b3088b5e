"""The promotion rule: whether a new model version beats the champion, and the tags that record why.

Pure functions of metric sets and the gate config, with no store behind them, so the rule is read,
tested and changed on its own; ``storage.mlflow.registry`` applies it to the registry and answers
with a ``PromotionDecision``, defined here so readers of decisions need no MLflow import.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from storage.config import GateConfig

# Comparisons allow for float rounding: 0.06 - 0.05 is 0.009999999999999995, which must pass a
# required gain of 0.01.
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class GateCheck:
    """One metric the gate compared. ``change`` = new - champion (raw); ``limit`` is the required gain
    (role ``metric``) or the allowed worsening (role ``guard``), in the metric's units."""

    role: str  # "metric" | "guard" | "head"
    new: float | None
    champion: float | None
    change: float | None
    limit: float | None
    # "passed" | "failed" | "missing" (no value on a side) | "skipped" (missing, ignored) |
    # "no-champion" (nothing to compare with: the version was promoted without the check)
    status: str


@dataclass(frozen=True)
class GateResult:
    promoted: bool
    reason: str
    checks: dict[str, GateCheck]


class PromotionDecision(BaseModel):
    """What happened to one model version, and why: the registry's answer to a promotion
    (``storage.mlflow.registry.promote`` / ``promote_manually``). Frozen; unknown fields are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    promoted: bool  # the version holds the champion alias after the decision
    version: str
    champion_before: str | None
    decided_by: str  # "gate" | "manual"
    reason: str
    checks: dict[str, GateCheck] = Field(default_factory=dict)


def _finite(metrics: Mapping[str, float] | None, key: str) -> float | None:
    value = None if metrics is None else metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _missing_side(new: float | None, champion: float | None, champion_version: str) -> str:
    sides = [side for side, v in (("the new version", new), (f"champion v{champion_version}", champion)) if v is None]
    return " and ".join(sides)


def decide(
    gate: GateConfig,
    new_metrics: Mapping[str, float],
    champion_metrics: Mapping[str, float] | None,
    champion_version: str | None = None,
) -> GateResult:
    """The promotion gate, a pure function of the two metric sets (``None``: no champion).

    With gain = new - champion if higher is better else champion - new, and worsening = new -
    champion if the guard is lower-is-better else champion - new::

        promote  <=>  no champion
                      or ( gain(metric) >= min_improvement
                           and worsening(guard) <= max_worsening        (absolute)
                                                   max_worsening * |champion guard|   (relative)
                           and champion head - new head <= head_max_drop )

    The head check (``head_metric``, higher is better) keeps a rare-caption gain bought by erasing
    what the model knew about well-covered individuals from ever being promoted.
    A missing or non-finite value of ``metric`` on either side rejects (nothing to compare). A
    missing guard or head value rejects with ``missing_guard="reject"`` and is ignored (status ``skipped``,
    said in the reason) with ``"skip"``. ``checks`` holds every number the decision used.
    """
    if champion_metrics is None:
        checks = {
            name: GateCheck(role, _finite(new_metrics, name), None, None, None, "no-champion")
            for role, name in (("metric", gate.metric), ("guard", gate.guard_metric), ("head", gate.head_metric))
            if name is not None
        }
        return GateResult(True, "no champion yet", checks)
    cv = champion_version or "?"
    checks: dict[str, GateCheck] = {}
    failed: list[str] = []
    passed: list[str] = []

    new, old = _finite(new_metrics, gate.metric), _finite(champion_metrics, gate.metric)
    if new is None or old is None:
        checks[gate.metric] = GateCheck("metric", new, old, None, gate.min_improvement, "missing")
        failed.append(f"{gate.metric} missing on {_missing_side(new, old, cv)}")
    else:
        gain = new - old if gate.higher_is_better else old - new
        ok = gain >= gate.min_improvement - _TOLERANCE
        checks[gate.metric] = GateCheck("metric", new, old, new - old, gate.min_improvement, "passed" if ok else "failed")
        text = f"{gate.metric} {new:.4g} vs {old:.4g}: gain {gain:+.4g} {'>=' if ok else '<'} required {gate.min_improvement:g}"
        (passed if ok else failed).append(text)

    def guard(role: str, name: str, lower_is_better: bool, allowed_of, how_of) -> None:
        new, old = _finite(new_metrics, name), _finite(champion_metrics, name)
        if new is None or old is None:
            where = _missing_side(new, old, cv)
            if gate.missing_guard == "reject":
                checks[name] = GateCheck(role, new, old, None, None, "missing")
                failed.append(f"{role} {name} missing on {where}")
            else:
                checks[name] = GateCheck(role, new, old, None, None, "skipped")
                passed.append(f"{role} {name} not checked (missing on {where}; missing_guard=skip)")
            return
        worse = new - old if lower_is_better else old - new
        allowed = allowed_of(old)
        ok = worse <= allowed + _TOLERANCE
        checks[name] = GateCheck(role, new, old, new - old, allowed, "passed" if ok else "failed")
        text = f"{role} {name} {new:.4g} vs {old:.4g}: worsened by {worse:+.4g} {'<=' if ok else '>'} allowed {allowed:.4g}{how_of(old)}"
        (passed if ok else failed).append(text)

    if gate.guard_metric is not None:
        relative = gate.worsening == "relative"
        guard("guard", gate.guard_metric, gate.guard_lower_is_better,
              lambda old: gate.max_worsening * abs(old) if relative else gate.max_worsening,
              lambda old: f" ({gate.max_worsening:g} of {abs(old):.4g})" if relative else "")
    if gate.head_metric is not None:
        guard("head", gate.head_metric, False, lambda old: gate.head_max_drop, lambda old: "")

    promoted = not failed
    # the failing checks first: they are why a version stays challenger
    reason = "; ".join(failed + passed) + f" (champion v{cv})"
    return GateResult(promoted, reason, checks)


def _fmt(value: float | None) -> str:
    return "none" if value is None else repr(float(value))


def gate_tags(gate: GateConfig, result: GateResult, champion_before: str | None) -> dict[str, str]:
    """``result`` as model version tags: ``gate.decision`` (promoted|rejected), ``gate.reason``,
    ``gate.champion_version``, ``gate.config`` and, per compared metric,
    ``gate.<metric>.{role,new,champion,change,limit,status}`` (numbers as ``repr``, ``none`` if absent)."""
    tags = {
        "gate.decision": "promoted" if result.promoted else "rejected",
        "gate.reason": result.reason,
        "gate.champion_version": champion_before or "none",
        "gate.config": json.dumps(gate.model_dump(), sort_keys=True),
    }
    for name, check in result.checks.items():
        tags[f"gate.{name}.role"] = check.role
        tags[f"gate.{name}.new"] = _fmt(check.new)
        tags[f"gate.{name}.champion"] = _fmt(check.champion)
        tags[f"gate.{name}.change"] = _fmt(check.change)
        tags[f"gate.{name}.limit"] = _fmt(check.limit)
        tags[f"gate.{name}.status"] = check.status
    return tags


"""Calibrating psi on a validation draw: the search space, one trial's config, its score and the choice.

``pogdiff tune`` runs short fine-tunes over psi's knobs. The *reference* trial is lam = 0, plain
fine-tuning. A searched trial is *feasible* when its many-bucket accuracy is at most
``head_max_drop`` below the reference's, so a few-bucket gain bought by erasing what the model knew
never wins. Every trial's score is

    score = (few/grecall + few/accuracy) / 2          (on the validation draw)

and the chosen config is the feasible trial with the highest score: the reference itself when no
borrowing beats plain fine-tuning. The sampler (Optuna's TPE) is told the score, less 1 for an
infeasible trial, so it learns to avoid the region where borrowing collapses the conditioning.
Pure library code: the study's storage, the runs and the flow live in tasks/ and flows/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import optuna

from pogdiff.config import PoGConfig, TrainConfig, TuneConfig, TuneSpace
from pogdiff.tables import MISSING, fmt, markdown

SCORE_METRICS = ("few/grecall", "few/accuracy")
HEAD_METRIC = "many/accuracy"
INFEASIBLE_PENALTY = 1.0  # scores lie in [0, 1]: any feasible trial ranks above every infeasible one
REFERENCE: dict[str, Any] = {"lam": 0.0}
STUDIES_DIR = "tune"  # under the settings' home: one folder per study (the first 16 hex digits of its key)
JOURNAL_FILE = "study.journal"  # in a study folder: the optuna journal, the resumable study
TUNED_FILE = "tuned.yaml"  # in a study folder: the retrain config with the chosen knobs


def suggest(trial: optuna.Trial, space: TuneSpace) -> dict[str, Any]:
    """psi's knobs for one trial: lam log-uniform, a, b, similarity_quantile uniform, k an integer,
    timestep_weight a choice. A range with low == high is fixed (not searched)."""

    def num(name: str, log: bool = False) -> float:
        low, high = getattr(space, name)
        return float(low) if low == high else trial.suggest_float(name, low, high, log=log)

    k_low, k_high = space.k
    return {
        "lam": num("lam", log=True),
        "a": num("a"),
        "b": num("b"),
        "k": k_low if k_low == k_high else trial.suggest_int("k", k_low, k_high),
        "similarity_quantile": num("similarity_quantile"),
        "timestep_weight": space.timestep_weight[0] if len(space.timestep_weight) == 1
        else trial.suggest_categorical("timestep_weight", list(space.timestep_weight)),
    }


def trial_pog(base: PoGConfig, knobs: Mapping[str, Any]) -> PoGConfig:
    """The objective of a trial: lam = 0 is plain fine-tuning (``vanilla``, no neighbour forward at all),
    anything else PoGDiff with ``knobs`` over ``base``'s other settings."""
    if knobs.get("lam", 0.0) == 0.0:
        return base.model_copy(update={"method": "vanilla"})
    return PoGConfig.model_validate({**base.model_dump(), **knobs, "method": "pogdiff"})


def trial_train(train: TrainConfig, tune: TuneConfig, knobs: Mapping[str, Any]) -> TrainConfig:
    """``train`` with the trial's objective and the tune budget's steps."""
    return train.model_copy(update={"pog": trial_pog(train.pog, knobs), "steps": tune.steps_per_trial or train.steps})


def score(metrics: Mapping[str, float]) -> float:
    """(few/grecall + few/accuracy) / 2; NaN when the validation draw has no few bucket."""
    values = [metrics.get(k, math.nan) for k in SCORE_METRICS]
    return math.nan if any(v is None or not math.isfinite(v) for v in values) else sum(values) / len(values)


def feasible(metrics: Mapping[str, float], reference: Mapping[str, float], head_max_drop: float) -> bool:
    """Many-bucket accuracy at most ``head_max_drop`` below the reference's (True without a many bucket)."""
    new, ref = metrics.get(HEAD_METRIC), reference.get(HEAD_METRIC)
    if new is None or ref is None or not (math.isfinite(new) and math.isfinite(ref)):
        return True
    return ref - new <= head_max_drop + 1e-9


def sampler_value(metrics: Mapping[str, float], reference: Mapping[str, float], head_max_drop: float) -> float:
    """What the sampler is told: the score, less INFEASIBLE_PENALTY when the trial is infeasible (0 for NaN)."""
    s = score(metrics)
    s = 0.0 if math.isnan(s) else s
    return s if feasible(metrics, reference, head_max_drop) else s - INFEASIBLE_PENALTY


@dataclass(frozen=True)
class TrialResult:
    number: int  # -1 for the reference
    knobs: dict[str, Any]
    metrics: dict[str, float]

    @property
    def score(self) -> float:
        return score(self.metrics)


def choose(reference: TrialResult, trials: list[TrialResult], head_max_drop: float) -> TrialResult:
    """The feasible trial with the highest score; the reference wins ties and NaN scores never win."""
    best = reference
    for t in trials:
        s = t.score
        if feasible(t.metrics, reference.metrics, head_max_drop) and not math.isnan(s) and (math.isnan(best.score) or s > best.score):
            best = t
    return best


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return fmt(None if math.isnan(v) else v, ".3g")  # NaN: a metric or score the trial lacks
    return str(v)


def trials_table(reference: TrialResult, trials: list[TrialResult], chosen: TrialResult, head_max_drop: float) -> str:
    """Markdown: one row per trial (the reference first), its knobs, validation metrics, score and status."""
    knobs = ["lam", "a", "b", "k", "similarity_quantile", "timestep_weight"]
    metrics = ["few/grecall", "few/accuracy", "many/accuracy", "overall/separability"]
    rows = []
    for t in [reference, *sorted(trials, key=lambda t: t.number)]:
        status = "reference" if t.number < 0 else "feasible" if feasible(t.metrics, reference.metrics, head_max_drop) else "infeasible"
        if t is chosen or (t.number == chosen.number):
            status += ", chosen"
        rows.append(["ref" if t.number < 0 else str(t.number), *(_cell(t.knobs.get(k, MISSING)) for k in knobs),
                     *(_cell(float(t.metrics.get(m, math.nan))) for m in metrics), _cell(t.score), status])
    return "\n".join(markdown(["trial", *knobs, *metrics, "score", "status"], rows)) + "\n"

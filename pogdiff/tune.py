"""Calibrating psi and exposure on a validation draw: the search space, one trial's config, its score and the choice.

``pogdiff tune`` runs short fine-tunes over psi's knobs and the sampling mode. The *reference* is
plain fine-tuning (lam = 0, uniform sampling), trained on ``tune.reference_seeds`` seeds; the spread
of its score over them (max - min) is the tune's measured noise. A searched trial trains on the
first seed and is scored on the same prompts (paired with the reference's first run). It is
*feasible* when its many-bucket accuracy is at most ``head_max_drop`` below the reference's, so a
few-bucket gain bought by erasing what the model knew never wins. Every trial's score is

    score = (few/holdout_grecall + few/holdout_accuracy) / 2    where the data has held-out photos
    score = (few/grecall + few/accuracy) / 2                    otherwise (training-caption prompts)

(held-out prompts first, because prompting with the training captions rewards copying the rare
photos), and the chosen config is the feasible trial with the highest score among those that beat
the reference by more than the noise: the reference itself when none does. The sampler (Optuna's
TPE) is told the score, less 1 for an infeasible trial, so it learns to avoid the region where
borrowing collapses the conditioning. Pure library code: the study's storage, the runs and the
flow live in tasks/ and flows/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import optuna

from pogdiff.config import PoGConfig, TrainConfig, TuneConfig, TuneSpace
from pogdiff.tables import MISSING, fmt, markdown

SCORE_METRICS = ("few/grecall", "few/accuracy")
HOLDOUT_SCORE_METRICS = ("few/holdout_grecall", "few/holdout_accuracy")
SAMPLING_KNOBS = {"repeats": "max_repeats", "sqrt": "repeat_threshold"}  # each balanced mode's own knob
HEAD_METRIC = "many/accuracy"
INFEASIBLE_PENALTY = 1.0  # scores lie in [0, 1]: any feasible trial ranks above every infeasible one
REFERENCE: dict[str, Any] = {"lam": 0.0}
STUDIES_DIR = "tune"  # under the settings' home: one folder per study (the first 16 hex digits of its key)
JOURNAL_FILE = "study.journal"  # in a study folder: the optuna journal, the resumable study
TUNED_FILE = "tuned.yaml"  # in a study folder: the retrain config with the chosen knobs


def suggest(trial: optuna.Trial, space: TuneSpace) -> dict[str, Any]:
    """One trial's knobs: the sampling mode (a choice) and its knob (log-uniform); for a balanced mode,
    whether to borrow (so balancing alone is a candidate; uniform without borrowing is the reference);
    then, when borrowing, psi's knobs: lam log-uniform, a, b, similarity_quantile uniform, k an
    integer, timestep_weight a choice. A range with low == high, or a single choice, is fixed."""

    def num(name: str, log: bool = False) -> float:
        low, high = getattr(space, name)
        return float(low) if low == high else trial.suggest_float(name, low, high, log=log)

    def pick(name: str, choices: tuple) -> Any:
        return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))

    sampling = pick("sampling", space.sampling)
    knobs: dict[str, Any] = {"sampling": sampling}
    if sampling in SAMPLING_KNOBS:
        knobs[SAMPLING_KNOBS[sampling]] = num(SAMPLING_KNOBS[sampling], log=True)
        if not trial.suggest_categorical("borrow", [True, False]):
            return {**knobs, "lam": 0.0}
    k_low, k_high = space.k
    return {
        **knobs,
        "lam": num("lam", log=True),
        "a": num("a"),
        "b": num("b"),
        "k": k_low if k_low == k_high else trial.suggest_int("k", k_low, k_high),
        "similarity_quantile": num("similarity_quantile"),
        "timestep_weight": pick("timestep_weight", space.timestep_weight),
    }


def trial_pog(base: PoGConfig, knobs: Mapping[str, Any]) -> PoGConfig:
    """The objective of a trial: lam = 0 is plain fine-tuning (``vanilla``, no neighbour forward at all),
    anything else PoGDiff with ``knobs``' psi knobs over ``base``'s other settings."""
    if knobs.get("lam", 0.0) == 0.0:
        return base.model_copy(update={"method": "vanilla"})
    psi = {k: v for k, v in knobs.items() if k in PoGConfig.model_fields}
    return PoGConfig.model_validate({**base.model_dump(), **psi, "method": "pogdiff"})


def trial_train(train: TrainConfig, tune: TuneConfig, knobs: Mapping[str, Any], seed: int | None = None) -> TrainConfig:
    """``train`` with the trial's objective and sampling (uniform where the knobs name none), the tune
    budget's steps, and ``seed`` (default: ``train.seed``)."""
    exposure = {k: knobs[k] for k in ("sampling", *SAMPLING_KNOBS.values()) if k in knobs}
    return train.model_copy(update={"pog": trial_pog(train.pog, knobs), "steps": tune.steps_per_trial or train.steps,
                                    "sampling": "uniform", **exposure, "seed": train.seed if seed is None else seed})


def score(metrics: Mapping[str, float]) -> float:
    """(few/holdout_grecall + few/holdout_accuracy) / 2 where both are present, else (few/grecall +
    few/accuracy) / 2; NaN when the validation draw has no few bucket."""
    names = HOLDOUT_SCORE_METRICS if all(k in metrics for k in HOLDOUT_SCORE_METRICS) else SCORE_METRICS
    values = [metrics.get(k, math.nan) for k in names]
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
    """A finished trial (number -1: the reference) and its validation metrics. The reference also carries
    the score of each of its seeds, the first being the seed the searched trials train on."""

    number: int
    knobs: dict[str, Any]
    metrics: dict[str, float]
    seed_scores: tuple[float, ...] = ()

    @property
    def score(self) -> float:
        return score(self.metrics)

    @property
    def noise(self) -> float:
        """The spread (max - min) of the reference's score over its seeds; 0 with fewer than two."""
        finite = [s for s in self.seed_scores if math.isfinite(s)]
        return max(finite) - min(finite) if len(finite) > 1 else 0.0


def _best(reference: TrialResult, trials: list[TrialResult], head_max_drop: float) -> TrialResult:
    best = reference
    for t in trials:
        s = t.score
        beats_noise = math.isnan(reference.score) or s - reference.score > reference.noise
        if feasible(t.metrics, reference.metrics, head_max_drop) and not math.isnan(s) and beats_noise and (
                math.isnan(best.score) or s > best.score):
            best = t
    return best


def borrows(t: TrialResult) -> bool:
    return float(t.knobs.get("lam", 0.0)) > 0


def choose(reference: TrialResult, trials: list[TrialResult], head_max_drop: float) -> TrialResult:
    """The feasible trial with the highest score among those above the reference's by more than its
    ``noise``; the reference when none is, and NaN scores never win. Borrowing must pay for itself
    as well: a trial with lam > 0 is chosen only when it also beats the best such trial without
    borrowing (balancing alone) by more than the noise, else that one is. The best of several noisy
    trials is an optimistic draw; lam = 0 is the simpler model and the fallback."""
    best = _best(reference, trials, head_max_drop)
    if best is reference or not borrows(best):
        return best
    alone = _best(reference, [t for t in trials if not borrows(t)], head_max_drop)
    if alone is reference or math.isnan(alone.score) or best.score - alone.score > reference.noise:
        return best
    return alone


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return fmt(None if math.isnan(v) else v, ".3g")  # NaN: a metric or score the trial lacks
    return str(v)


def trials_table(reference: TrialResult, trials: list[TrialResult], chosen: TrialResult, head_max_drop: float) -> str:
    """Markdown: one row per trial (the reference first), its knobs, validation metrics, score, its
    difference from the reference's (paired: same seed and prompts) and status; under it, the noise."""
    knobs = ["sampling", *SAMPLING_KNOBS.values(), "lam", "a", "b", "k", "similarity_quantile", "timestep_weight"]
    holdout = all(k in reference.metrics for k in HOLDOUT_SCORE_METRICS)
    metrics = [*(HOLDOUT_SCORE_METRICS if holdout else ()), "few/grecall", "few/accuracy", "many/accuracy", "overall/separability"]
    rows = []
    for t in [reference, *sorted(trials, key=lambda t: t.number)]:
        status = "reference" if t.number < 0 else "feasible" if feasible(t.metrics, reference.metrics, head_max_drop) else "infeasible"
        if t.number >= 0 and t.score - reference.score <= reference.noise:
            status += ", within noise"
        if t is chosen or (t.number == chosen.number):
            status += ", chosen"
        knob_cells = [_cell(t.knobs.get(k, "uniform" if k == "sampling" else MISSING)) for k in knobs]
        delta = "—" if t.number < 0 else f"{t.score - reference.score:+.3f}"
        rows.append(["ref" if t.number < 0 else str(t.number), *knob_cells,
                     *(_cell(float(t.metrics.get(m, math.nan))) for m in metrics), _cell(t.score), delta, status])
    seeds = ", ".join(f"{s:.3f}" for s in reference.seed_scores)
    note = (f"\nNoise: the reference's score over its {len(reference.seed_scores)} training seeds: {seeds}; spread "
            f"{reference.noise:.3f}. A trial (trained on the first seed, scored on the same prompts) is chosen only "
            f"when its score beats the reference's by more than the spread, and a trial that borrows (lam > 0) only "
            f"when it also beats the best trial without borrowing by more than the spread.\n") if reference.seed_scores else ""
    return "\n".join(markdown(["trial", *knobs, *metrics, "score", "Δ score", "status"], rows)) + "\n" + note

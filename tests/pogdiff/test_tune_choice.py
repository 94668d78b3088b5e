"""The tune's arithmetic: what a trial searches (sampling beside borrowing), its training config, the
score (held-out prompts first) and a choice that must beat the reference by more than its noise."""

import math

import optuna
import pytest

from pogdiff.config import TrainConfig, TuneConfig, TuneSpace
from pogdiff.tune import TrialResult, choose, score, suggest, trial_train, trials_table

REF = {"few/grecall": 0.5, "few/accuracy": 0.5, "many/accuracy": 0.95}


def _trial(number, s, many=0.95, **knobs):
    return TrialResult(number, {"lam": 0.1, **knobs}, {"few/grecall": s, "few/accuracy": s, "many/accuracy": many})


def test_a_trial_must_beat_the_reference_by_more_than_its_spread_over_seeds():
    reference = TrialResult(-1, {"lam": 0.0}, REF, seed_scores=(0.5, 0.44))
    assert reference.noise == pytest.approx(0.06)
    within, beyond = _trial(0, 0.55), _trial(1, 0.57)
    assert choose(reference, [within], 0.03) is reference  # +0.05 is inside the measured noise
    assert choose(reference, [within, beyond], 0.03) is beyond
    head_loss = _trial(2, 0.9, many=0.9)
    assert choose(reference, [within, head_loss], 0.03) is reference  # infeasible: the head dropped 0.05
    table = trials_table(reference, [within, beyond], beyond, 0.03)
    assert "spread 0.060" in table and "+0.050" in table and "within noise" in table and "+0.070" in table


def test_borrowing_must_also_beat_balancing_alone_by_more_than_the_noise():
    reference = TrialResult(-1, {"lam": 0.0}, REF, seed_scores=(0.5, 0.45))  # noise 0.05
    balanced = _trial(0, 0.70, sampling="repeats", lam=0.0)
    lucky = _trial(1, 0.74, sampling="sqrt", lam=0.007)  # +0.04 over balancing alone: inside the noise
    assert choose(reference, [balanced, lucky], 0.03) is balanced
    pays = _trial(2, 0.76, sampling="sqrt", lam=0.007)  # +0.06: beyond it
    assert choose(reference, [balanced, lucky, pays], 0.03) is pays
    # without a balanced trial above the reference, borrowing is judged against the reference alone
    assert choose(reference, [_trial(3, 0.52, sampling="repeats", lam=0.0), lucky], 0.03) is lucky
    table = trials_table(reference, [balanced, lucky], balanced, 0.03)
    assert "beats the best trial without borrowing by more than the spread" in table


def test_without_a_second_seed_there_is_no_noise_margin():
    reference = TrialResult(-1, {"lam": 0.0}, REF, seed_scores=(0.5,))
    assert reference.noise == 0.0
    assert choose(reference, [_trial(0, 0.51)], 0.03).number == 0


def test_score_prefers_held_out_prompts_where_the_data_has_them():
    assert score(REF) == 0.5
    held = {**REF, "few/holdout_grecall": 0.2, "few/holdout_accuracy": 0.4}
    assert score(held) == pytest.approx(0.3)
    assert math.isnan(score({"many/accuracy": 1.0}))


def test_suggest_searches_sampling_its_knob_and_whether_to_borrow():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = [suggest(study.ask(), TuneSpace()) for _ in range(60)]
    assert {k["sampling"] for k in seen} == {"uniform", "repeats", "sqrt"}
    for knobs in seen:
        if knobs["sampling"] == "uniform":
            assert knobs["lam"] > 0  # uniform without borrowing is the reference, never searched again
        if knobs["sampling"] == "sqrt":
            assert 0.02 <= knobs["repeat_threshold"] <= 0.5 and "max_repeats" not in knobs
        if knobs["sampling"] == "repeats":
            assert 3 <= knobs["max_repeats"] <= 30 and "repeat_threshold" not in knobs
        if knobs["lam"] == 0:
            assert set(knobs) <= {"sampling", "lam", "repeat_threshold", "max_repeats"}  # balancing alone
    assert any(k["lam"] == 0 for k in seen) and any(k["lam"] > 0 and k["sampling"] != "uniform" for k in seen)
    fixed = optuna.create_study()
    assert suggest(fixed.ask(), TuneSpace(sampling=("uniform",), lam=(0.1, 0.1)))["sampling"] == "uniform"


def test_trial_train_sets_sampling_objective_budget_and_seed():
    train = TrainConfig(steps=250, seed=3, sampling="sqrt")
    tune = TuneConfig(steps_per_trial=20)
    plain = trial_train(train, tune, {"lam": 0.0})
    assert (plain.pog.method, plain.sampling, plain.steps, plain.seed) == ("vanilla", "uniform", 20, 3)
    balanced = trial_train(train, tune, {"sampling": "repeats", "max_repeats": 7.0, "lam": 0.0}, seed=4)
    assert (balanced.pog.method, balanced.sampling, balanced.max_repeats, balanced.seed) == ("vanilla", "repeats", 7.0, 4)
    borrowing = trial_train(train, tune, {"sampling": "sqrt", "repeat_threshold": 0.2, "lam": 0.3, "k": 2})
    assert (borrowing.pog.method, borrowing.pog.lam, borrowing.pog.k, borrowing.repeat_threshold) == ("pogdiff", 0.3, 2, 0.2)

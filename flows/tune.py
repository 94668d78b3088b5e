"""The tune flow: ingest -> index -> the lam = 0 reference trial -> searched trials -> the chosen config.

Trials are asked from the Optuna study in batches of ``tune.parallel_trials`` and mapped over the
flow's task runner; each is a nested MLflow run under one parent run, which gets the trials table,
the plot and the chosen config (``tuned.yaml``, a retrain config) at the end.
"""

from __future__ import annotations

import time

from prefect import flow, unmapped

from flows.prepare import prepare
from flows.runners import task_runner
from pogdiff.tune import REFERENCE, choose, suggest
from storage.mlflow import connection, runs
from storage.settings import load_settings
from tasks.config import RetrainConfig
from tasks.results import Chosen, TuneResult
from tasks.tune import (
    finished_trials,
    open_parent_run,
    open_study,
    publish_result,
    record_reference,
    record_trial,
    reference_of,
    reference_runs,
    run_trial,
    study_dir,
    tune_key,
)


@flow(name="tune", log_prints=True, task_runner=task_runner())
def tune(source: str, config: RetrainConfig = RetrainConfig()) -> TuneResult:
    """Calibrate psi on ``source`` (pogdiff/tune.py); returns the chosen knobs, the trials and where the config is."""
    started = time.monotonic()
    settings = load_settings()
    data = prepare(source, settings, config.ingest, config.index).data

    key = tune_key(config, data.snapshot_id)
    folder = study_dir(settings, key)
    study = open_study(settings, config, key)
    parent = open_parent_run(settings, config, key, data.snapshot_id)
    tc = config.tune
    try:
        # The reference on each of its seeds (the first is the seed every trial trains on): their spread is the noise.
        seeds = [config.train.seed + i for i in range(tc.reference_seeds)]
        for seed in seeds[len(reference_runs(study)):]:
            record_reference(study, run_trial(settings, config, data, REFERENCE, -1, parent, str(folder), seed), seed)
        reference = reference_of(study)
        out_of_time = False
        while (left := tc.trials - len(finished_trials(study))) > 0:
            if tc.time_limit_minutes is not None and time.monotonic() - started > 60 * tc.time_limit_minutes:
                out_of_time = True
                break
            asked = [study.ask() for _ in range(min(left, tc.parallel_trials))]
            knobs = [suggest(t, tc.space) for t in asked]
            futures = run_trial.map(unmapped(settings), unmapped(config), unmapped(data), knobs, [t.number for t in asked],
                                    unmapped(parent), unmapped(str(folder)))
            for trial, future in zip(asked, futures):
                record_trial(study, trial, future.result(), reference, tc.head_max_drop)
        trials = finished_trials(study)
        chosen = choose(reference, trials, tc.head_max_drop)
        tuned_path, table = publish_result(settings, config, parent, reference, trials, chosen, str(folder))
    except BaseException:
        connection.use(settings)
        runs.end(parent, "FAILED")  # the next tune of the same study resumes this run
        raise
    runs.end(parent, "FINISHED")
    print(table)
    return TuneResult(key=key, parent_run_id=parent, chosen=Chosen(trial=chosen.number, knobs=chosen.knobs, score=chosen.score),
                      reference_score=reference.score, trials=len(trials), out_of_time=out_of_time, tuned_config=str(tuned_path),
                      table=table)

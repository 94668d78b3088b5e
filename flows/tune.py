"""The tune flow: ingest -> index -> the lam = 0 reference trial -> searched trials -> the chosen config.

Trials are asked from the Optuna study in batches of ``tune.parallel_trials`` and mapped over the
flow's task runner; each is a nested MLflow run under one parent run, which gets the trials table,
the plot and the chosen config (``tuned.yaml``, a retrain config) at the end.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import yaml
from prefect import flow, unmapped

from flows.runners import task_runner
from pogdiff.config import RetrainConfig
from pogdiff.plots import save_png, tune_trials
from pogdiff.tune import REFERENCE, TrialResult, choose, feasible, sampler_value, suggest, trials_table, tuned_config
from storage import tracking
from storage.settings import load_settings
from tasks.caching import cached, index_key, ingest_key
from tasks.dataset import dataset_snapshot
from tasks.index import embed_shard, index_captions, index_images, plan_embedding
from tasks.ingest import ingest
from tasks.tune import (
    REFERENCE_ATTR,
    finished_trials,
    open_parent_run,
    open_study,
    reference_of,
    run_trial,
    study_dir,
    tune_key,
)


@flow(name="tune", log_prints=True, task_runner=task_runner())
def tune(source: str, config: RetrainConfig = RetrainConfig()) -> dict:
    """Calibrate psi on ``source`` (pogdiff/tune.py); returns the chosen knobs, the trials and where the config is."""
    started = time.monotonic()
    settings = load_settings()
    cached(ingest, ingest_key, settings)(source, settings, config.ingest)
    snapshot = dataset_snapshot(settings)
    shards = embed_shard.map(unmapped(config.index), plan_embedding(settings, config.index))
    cached(index_captions, index_key, settings)(settings, config.index, snapshot["snapshot_id"], shards)
    cached(index_images, index_key, settings)(settings, config.index, snapshot["snapshot_id"])

    key = tune_key(config, snapshot["snapshot_id"])
    folder = study_dir(settings, key)
    study = open_study(settings, config, key)
    parent = open_parent_run(settings, config, key, snapshot["snapshot_id"])
    tc = config.tune
    try:
        reference = reference_of(study)
        if reference is None:
            ref = run_trial(settings, config, REFERENCE, -1, parent, str(folder))
            study.set_user_attr(REFERENCE_ATTR, {"knobs": ref["knobs"], "metrics": ref["metrics"], "run_id": ref["run_id"]})
            reference = reference_of(study)
        out_of_time = False
        while (left := tc.trials - len(finished_trials(study))) > 0:
            if tc.time_limit_minutes is not None and time.monotonic() - started > 60 * tc.time_limit_minutes:
                out_of_time = True
                break
            asked = [study.ask() for _ in range(min(left, tc.parallel_trials))]
            knobs = [suggest(t, tc.space) for t in asked]
            futures = run_trial.map(unmapped(settings), unmapped(config), knobs, [t.number for t in asked],
                                    unmapped(parent), unmapped(str(folder)))
            for trial, future in zip(asked, futures):
                done = future.result()
                trial.set_user_attr("knobs", done["knobs"])
                trial.set_user_attr("metrics", done["metrics"])
                trial.set_user_attr("run_id", done["run_id"])
                study.tell(trial, sampler_value(done["metrics"], reference.metrics, tc.head_max_drop))
        trials = finished_trials(study)
        chosen = choose(reference, trials, tc.head_max_drop)
        tuned = tuned_config(config, chosen.knobs)
        folder.mkdir(parents=True, exist_ok=True)
        tuned_path = folder / "tuned.yaml"
        _write_tuned(tuned, chosen, tuned_path)
        table = trials_table(reference, trials, chosen, tc.head_max_drop)
        _log_result(parent, reference, trials, chosen, tc.head_max_drop, table, tuned_path)
    except BaseException:
        tracking.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
        tracking.end(parent, "FAILED")  # the next tune of the same study resumes this run
        raise
    tracking.end(parent, "FINISHED")
    print(table)
    return {"key": key, "parent_run_id": parent, "chosen": {"trial": chosen.number, "knobs": chosen.knobs, "score": chosen.score},
            "reference_score": reference.score, "trials": len(trials), "out_of_time": out_of_time, "tuned_config": str(tuned_path),
            "table": table}


def _write_tuned(config: RetrainConfig, chosen: TrialResult, path: Path) -> None:
    what = "plain fine-tuning (lam = 0): no borrowing beat it" if chosen.number < 0 else f"trial {chosen.number}"
    text = (f"# Written by `pogdiff tune`: the retrain config with the chosen psi knobs ({what}; validation score "
            f"{chosen.score:.3f}).\n" + yaml.safe_dump(config.model_dump(mode="json", exclude={"tune"}), sort_keys=False))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _log_result(parent: str, reference: TrialResult, trials: list[TrialResult], chosen: TrialResult, head_max_drop: float,
                table: str, tuned_path: Path) -> None:
    points = [(t.number, float(t.knobs["lam"]), t.score, feasible(t.metrics, reference.metrics, head_max_drop)) for t in trials]
    with tempfile.TemporaryDirectory() as tmp, tracking.resume(parent):
        out = Path(tmp)
        (out / "trials.md").write_text(table, encoding="utf-8")
        (out / "tuned.yaml").write_text(tuned_path.read_text(encoding="utf-8"), encoding="utf-8")
        save_png(tune_trials(reference.score, points, f"{len(trials)} trials; chosen: "
                             f"{'lam = 0' if chosen.number < 0 else f'trial {chosen.number}'}"), out / "trials.png")
        tracking.log_artifacts(out, "tune")
        tracking.log_metrics({"tune/reference_score": reference.score, "tune/chosen_score": chosen.score,
                              "tune/chosen_lam": float(chosen.knobs["lam"]), "tune/trials": float(len(trials))})
        tracking.set_tags(parent, {"tune.chosen": "reference" if chosen.number < 0 else str(chosen.number)})

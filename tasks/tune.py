"""Tune tasks: the Optuna study on disk, the parent MLflow run, and one trial (fine-tune + validation draw).

The study is an Optuna journal file under ``<home>/tune/<key>/``, keyed by what is tuned (the config
less the tune budget) and the dataset snapshot, so a crashed or extended tune continues from its
finished trials. Trials run in their own experiment (``<registry.experiment>-tune``), so a retrain's
crash recovery never mistakes a trial for one of its own runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import optuna
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import MissingContextError

from pogdiff.atomic import write_text_atomic
from pogdiff.config import EvaluateConfig
from pogdiff.demo import detector
from pogdiff.evaluation import evaluate
from pogdiff.pipelines.loader import load_pipeline
from pogdiff.plots import save_png, tune_trials
from pogdiff.trainer import train
from pogdiff.tune import (
    JOURNAL_FILE,
    STUDIES_DIR,
    TUNED_FILE,
    TrialResult,
    feasible,
    sampler_value,
    score,
    trial_pog,
    trial_train,
    trials_table,
)
from storage.mlflow import connection, runs
from storage.settings import Settings
from storage.training_set import DataVersion, load_holdout_set, load_real_set
from tasks.config import RetrainConfig
from tasks.describe import log_glossary
from tasks.results import TrialRun
from tasks.train import training_data

TUNE_KEY_TAG = "tune_key"
REFERENCE_ATTR = "reference"
# The tune budget: changing it extends or shortens the same study instead of starting another.
_BUDGET = {"trials", "time_limit_minutes", "parallel_trials"}


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("pogdiff.tune")


def experiment_of(config: RetrainConfig) -> str:
    return f"{config.registry.experiment}-tune"


def tune_key(config: RetrainConfig, snapshot_id: str) -> str:
    """sha256 of the config less the tune budget, and the snapshot: the same key continues the same study."""
    resolved = config.model_dump(mode="json")
    resolved["tune"] = {k: v for k, v in resolved["tune"].items() if k not in _BUDGET}
    return hashlib.sha256(json.dumps({"config": resolved, "snapshot_id": snapshot_id}, sort_keys=True).encode()).hexdigest()


def study_dir(settings: Settings, key: str) -> Path:
    return Path(settings.home) / STUDIES_DIR / key[:16]


def open_study(settings: Settings, config: RetrainConfig, key: str) -> optuna.Study:
    """Create or load the study; trials a crash left RUNNING are marked FAIL (their numbers are not reused)."""
    folder = study_dir(settings, key)
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(folder / JOURNAL_FILE)))
    sampler = optuna.samplers.TPESampler(seed=config.tune.seed, n_startup_trials=min(4, config.tune.trials))
    study = optuna.create_study(storage=storage, sampler=sampler, study_name=key[:16], direction="maximize", load_if_exists=True)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        _logger().warning("tune: trial %d was left running by a crashed tune; marked failed, a new trial replaces it", t.number)
    return study


def load_study(journal: Path) -> optuna.Study | None:
    """The study stored in a ``study.journal`` file, read as it is (nothing marked), or None when it holds none."""
    storage = JournalStorage(JournalFileBackend(str(journal)))
    names = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=names[0], storage=storage) if names else None


def finished_trials(study: optuna.Study) -> list[TrialResult]:
    return [TrialResult(t.number, t.user_attrs["knobs"], t.user_attrs["metrics"])
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def reference_runs(study: optuna.Study) -> list[dict]:
    """The reference's finished seeds, in the order they ran: ``{"seed", "knobs", "metrics", "run_id"}`` each.
    A study written before the reference had seeds holds one mapping: its single run (seed unrecorded)."""
    done = study.user_attrs.get(REFERENCE_ATTR, [])
    return [{"seed": None, **done}] if isinstance(done, dict) else list(done)


def reference_of(study: optuna.Study) -> TrialResult | None:
    """The reference as a trial: its first seed's knobs and metrics (what the searched trials pair with),
    and every finished seed's score; None before the first seed finished."""
    done = reference_runs(study)
    if not done:
        return None
    return TrialResult(-1, done[0]["knobs"], done[0]["metrics"], tuple(score(r["metrics"]) for r in done))


def record_reference(study: optuna.Study, done: TrialRun, seed: int) -> TrialResult:
    """Keep one seed of the lam = 0 reference in the study (it is not a sampled trial); a rerun skips it."""
    row = {"seed": seed, "knobs": done.knobs, "metrics": done.metrics, "run_id": done.run_id}
    study.set_user_attr(REFERENCE_ATTR, [*reference_runs(study), row])
    return reference_of(study)


def record_trial(study: optuna.Study, trial: optuna.Trial, done: TrialRun, reference: TrialResult, head_max_drop: float) -> None:
    """Keep a finished trial's knobs, metrics and run, and tell the sampler its value."""
    for key, value in (("knobs", done.knobs), ("metrics", done.metrics), ("run_id", done.run_id)):
        trial.set_user_attr(key, value)
    study.tell(trial, sampler_value(done.metrics, reference.metrics, head_max_drop))


def open_parent_run(settings: Settings, config: RetrainConfig, key: str, snapshot_id: str) -> str:
    """The tune's parent run: the one an earlier attempt of the same study left open, or a new one."""
    connection.use(settings)
    experiment = experiment_of(config)
    for status in ("RUNNING", "FAILED", "KILLED"):
        for run_id, tags in runs.unfinished_runs(experiment, status):
            if tags.get(TUNE_KEY_TAG) == key and tags.get("mlflow.parentRunId") is None:
                runs.set_tags(run_id, {"resumed": "true"})
                for child, child_tags in runs.unfinished_runs(experiment):
                    if child_tags.get("mlflow.parentRunId") == run_id:  # the trial the crash interrupted
                        runs.set_tags(child, {"failed_reason": "left RUNNING by a crashed tune; another trial replaces it"})
                        runs.end(child, "FAILED")
                return run_id
    tags = {TUNE_KEY_TAG: key, "dataset_snapshot_id": snapshot_id, "base_model": config.train.base_model}
    run_id = runs.start(experiment, run_name=f"tune-{snapshot_id}", tags=tags)
    with runs.resume(run_id):
        runs.log_config(config.model_dump(mode="json"))
    return run_id


# Never retried by Prefect: a trial is minutes of training; a crashed tune resumes from its finished trials.
@task(name="tune-trial")
def run_trial(settings: Settings, config: RetrainConfig, data: DataVersion, knobs: dict[str, Any], number: int,
              parent_run_id: str, folder: str, seed: int | None = None) -> TrialRun:
    """Fine-tune a fresh copy of the base with the trial's knobs (``pogdiff.tune.trial_train``) on training
    seed ``seed`` (default ``train.seed``), evaluate it on the validation draw (``tune.eval_seed``, at least
    ``tune.validation_images_per_individual`` images each) and log both into a child run of ``parent_run_id``.

    Returns its ``TrialRun`` (number, knobs, metrics, child run, seconds); the trial's model is not kept.
    """
    log = _logger()
    started = time.perf_counter()
    cfg = trial_train(config.train, config.tune, knobs, seed)
    pipe = load_pipeline(cfg.base_model)
    column = config.evaluate.individual_column
    train_set = training_data(settings, config.index, cfg.base_model, pipe, data, column)
    real = load_real_set(settings.dataset_uri, pipe.image_size, column, data.snapshot_id)
    # The tune's source is its validation draw: scoring on its held-out photos never sees the data a
    # retrain reports on, and keeps copying the rare training photos from winning (pogdiff/tune.py).
    holdout = load_holdout_set(settings.dataset_uri, pipe.image_size, column, data.snapshot_id)
    eval_cfg = validation_evaluate(config)
    label = "reference" if number < 0 else f"trial-{number:03d}"
    out = Path(folder) / (label if seed is None else f"{label}-seed{seed}")
    connection.use(settings)
    name = ("reference (lam 0)" if number < 0 else f"trial {number}") + ("" if seed is None else f", seed {seed}")
    child = runs.start(experiment_of(config), run_name=name,
                           tags={"mlflow.parentRunId": parent_run_id, "tune_trial": str(number)})
    try:
        with runs.resume(child):
            runs.log_config({"knobs": knobs, "method": cfg.pog.method, "sampling": cfg.sampling, "steps": cfg.steps,
                             "seed": cfg.seed, "eval_seed": eval_cfg.seed,
                             "eval_min_images_per_individual": eval_cfg.min_images_per_individual})
            train(pipe, train_set, cfg, out, on_step=lambda step, m: runs.log_metrics({f"train/{k}": v for k, v in m.items()}, step=step),
                  resume=False)
            result = evaluate(pipe, real, eval_cfg, judge=detector.judge, holdout=holdout,
                              attributes=detector.attributes)  # as the evaluate task judges
            runs.log_metrics(result.metrics)
            log_glossary(result.metrics)
    except BaseException:
        runs.end(child, "FAILED")
        raise
    runs.end(child, "FINISHED")
    shutil.rmtree(out, ignore_errors=True)
    seconds = time.perf_counter() - started
    log.info("tune: %s %s: score %.3f (few accuracy %.3f, held out %.3f), many accuracy %.3f (%.0f s)", name, knobs,
             score(result.metrics), result.metrics.get("few/accuracy", float("nan")),
             result.metrics.get("few/holdout_accuracy", float("nan")), result.metrics.get("many/accuracy", float("nan")), seconds)
    return TrialRun(number=number, knobs=knobs, metrics=result.metrics, run_id=child, seconds=seconds)


def validation_evaluate(config: RetrainConfig) -> EvaluateConfig:
    """The evaluate section of a validation draw: ``tune.eval_seed`` (never the reported scores' seed), and
    at least ``tune.validation_images_per_individual`` images per individual."""
    ev = config.evaluate
    n_min = max(ev.min_images_per_individual, config.tune.validation_images_per_individual)
    return ev.model_copy(update={"seed": config.tune.eval_seed, "min_images_per_individual": n_min,
                                 "max_images_per_individual": max(ev.max_images_per_individual, n_min)})


def tuned_config(config: RetrainConfig, knobs: Mapping[str, Any]) -> RetrainConfig:
    """``config`` with the chosen objective and sampling in ``train`` (its own step budget and seed, not the trials')."""
    chosen = trial_train(config.train, config.tune, knobs)
    return config.model_copy(update={"train": chosen.model_copy(update={"steps": config.train.steps, "seed": config.train.seed})})


@task(name="publish-tune")
def publish_result(settings: Settings, config: RetrainConfig, parent_run_id: str, reference: TrialResult,
                   trials: list[TrialResult], chosen: TrialResult, folder: str) -> tuple[str, str]:
    """Write the chosen retrain config (``<folder>/tuned.yaml``), and give the parent run the trials table,
    plot and config, and the flow run the table as a Prefect artifact. Returns (config path, table)."""
    head_max_drop = config.tune.head_max_drop
    what = ("plain fine-tuning (lam = 0, uniform sampling): no trial beat it by more than the noise" if chosen.number < 0
            else f"trial {chosen.number}")
    text = (f"# Written by `pogdiff tune`: the retrain config with the chosen psi knobs ({what}; validation score "
            f"{chosen.score:.3f}).\n" + yaml.safe_dump(tuned_config(config, chosen.knobs).model_dump(mode="json", exclude={"tune"}),
                                                        sort_keys=False))
    path = write_text_atomic(Path(folder) / TUNED_FILE, text)
    table = trials_table(reference, trials, chosen, head_max_drop)
    points = [(t.number, float(t.knobs["lam"]), t.score, feasible(t.metrics, reference.metrics, head_max_drop)) for t in trials]
    connection.use(settings)
    with tempfile.TemporaryDirectory() as tmp_dir, runs.resume(parent_run_id):
        out = Path(tmp_dir)
        (out / "trials.md").write_text(table, encoding="utf-8")
        (out / TUNED_FILE).write_text(text, encoding="utf-8")
        save_png(tune_trials(reference.score, points, f"{len(trials)} trials; chosen: {'lam = 0' if chosen.number < 0 else what}"),
                 out / "trials.png")
        runs.log_artifacts(out, "tune")
        runs.log_metrics({"tune/reference_score": reference.score, "tune/reference_noise": reference.noise,
                          "tune/chosen_score": chosen.score, "tune/chosen_lam": float(chosen.knobs["lam"]),
                          "tune/trials": float(len(trials))})
    runs.set_tags(parent_run_id, {"tune.chosen": "reference" if chosen.number < 0 else str(chosen.number)})
    try:
        create_markdown_artifact(key="tune-trials", markdown=f"# pogdiff tune: chosen {what}\n\n{table}",
                                 description="pogdiff tune: every trial on the validation draw")
    except MissingContextError:
        pass  # called outside a flow run (notebooks, tests of the function itself)
    return str(path), table

"""`pogdiff tune` against a real Prefect server and a real local MLflow store: 2 trials x 5 steps on
the tiny model, SIGKILLed once the reference and a trial have finished, then run again: the rerun
keeps the finished trials (no trial trains twice), finishes the budget, and writes a retrain config
that loads. Every trial is scored on the validation draw (tune.eval_seed), never on evaluate.seed.
"""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from faultkit import cli_env, record, start_cli
from localserver import seed_mlflow_store, wait_for
from storage.mlflow import connection
from tasks.config import load_config
from tasks.tune import load_study

pytestmark = pytest.mark.slow  # servers, processes or whole flows: see pyproject's marker


def _study(home):
    journals = list((home / "tune").glob("*/study.journal"))
    return load_study(journals[0]) if journals else None


def _finished(home) -> int:
    study = _study(home)
    return 0 if study is None else len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def test_tune_resumes_from_finished_trials_after_a_kill_and_writes_a_loadable_config(prefect_api, tiny, tmp_path):
    source, base_config, _ = tiny
    config = yaml.safe_load(base_config.read_text())
    config["tune"] = {"trials": 2, "steps_per_trial": 5, "eval_seed": 99, "space": {"timestep_weight": ["constant"]}}
    config_path = tmp_path / "tune.yaml"
    config_path.write_text(yaml.safe_dump(config))
    home = tmp_path / "home"
    env = cli_env(home, prefect_api)
    seed_mlflow_store(home / "mlflow.db")
    args = ["tune", str(source), "--config", str(config_path), "--out", str(tmp_path / "tuned.yaml")]

    first = start_cli(args, env, tmp_path / "first.log")
    wait_for(lambda: _finished(home) >= 1 or first.proc.poll() is not None, 600, "the first searched trial", interval=0.5)
    assert first.proc.poll() is None, f"tune ended before the kill:\n{first.log.read_text()[-3000:]}"
    first.kill()
    study = _study(home)
    # the reference (plain fine-tuning) on both of its seeds came first: their spread is the tune's noise
    assert [(r["seed"], r["knobs"]) for r in study.user_attrs["reference"]] == [(0, {"lam": 0.0}), (1, {"lam": 0.0})]
    done_before = {t.number: t.user_attrs["run_id"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}

    code, log = start_cli(args, env, tmp_path / "second.log").wait(600)
    assert code == 0, log[-3000:]
    study = _study(home)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert len(complete) == 2
    # the trial finished before the kill was kept, not trained again
    assert {t.number: t.user_attrs["run_id"] for t in complete if t.number in done_before} == done_before

    connection.configure(f"sqlite:///{home / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name(f"{config['registry']['experiment']}-tune")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the killed attempt's parent was resumed
    parent = parents[0].info.run_id
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent}
    finished = [r for r in children if r.info.status == "FINISHED"]
    # the reference once per seed and each complete trial once; a trial the kill interrupted is FAILED, not left RUNNING
    assert sorted(int(r.data.tags["tune_trial"]) for r in finished) == [-1, -1, *sorted(t.number for t in complete)]
    assert all(r.info.status in ("FINISHED", "FAILED") for r in children)
    for r in finished:
        # scored on the validation draw: evaluate.seed (1234) is where the reported scores come from
        assert r.data.params["eval_seed"] == "99" and "few/grecall" in r.data.metrics and "many/accuracy" in r.data.metrics
        assert {"metrics_glossary.json", "metrics_glossary.md"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {a.path for a in client.list_artifacts(parent, "tune")} == {"tune/trials.md", "tune/trials.png", "tune/tuned.yaml"}

    tuned = load_config(tmp_path / "tuned.yaml")
    assert tuned.train.steps == config["train"]["steps"]  # the retrain's own budget, not the trials'
    assert tuned.train.pog.method in ("vanilla", "pogdiff")
    assert "chosen" in log and "trials" in log
    record("SIGKILL between tune trials", "tune", "rerun kept the finished trials, ran the rest, wrote a loadable config")

"""Faults of the outside world: a tracking server that is down, a LanceDB folder that cannot be
written, a full disk under a checkpoint, a diverging loss, a bad config.

The retrains run in the test process (``clirunner.run_cli``: the CLI's own ``main``, environment and
exit status); the faults that need a process of their own (SIGKILL, orphans) are in test_kill_stages.py
and test_orphans.py."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import torch
import yaml
from clirunner import run_cli
from faultkit import EXPERIMENT, MODEL_NAME, cli_env, record
from localserver import free_port
from mlflow.tracking import MlflowClient
from prefect import get_client, tags
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterTags
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.tasks import exponential_backoff
from safetensors.torch import load_file

from storage import vectors
from storage.mlflow import connection
from tasks import track


def _mlflow(home: Path) -> MlflowClient:
    connection.configure(f"sqlite:///{home / 'mlflow.db'}")
    return MlflowClient()


def _runs(home: Path):
    client = _mlflow(home)
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.slow
def test_mlflow_server_down_is_retried_then_one_clear_error(prefect_api, tiny, tmp_path, capfd, monkeypatch):
    source, config, _ = tiny
    home = tmp_path / "home"
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = cli_env(home, prefect_api, POGDIFF_MLFLOW_TRACKING_URI=url)
    # Prefect fixes a task's retry delays when the task is defined, from the settings of that moment
    # (io_retry_delay_s: tests/storage/test_settings.py checks it in a fresh interpreter); this
    # in-process run's task was defined long before, so its delays are shortened here: ~0.25, 0.5, 1 s
    monkeypatch.setattr(track.open_run, "retry_delay_seconds", exponential_backoff(backoff_factor=0.25)(track.open_run.retries))
    mark = f"test-{uuid4()}"  # the session's Prefect server is shared: this run is the one with this tag
    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        with tags(mark):
            result = run_cli(["retrain", str(source), "--config", str(config)], capfd, **env)
        rc, out = result.returncode, result.output
        (flow_run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[mark])))
        this_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        open_run = [t for t in client.read_task_runs(flow_run_filter=this_run) if t.name.startswith("open-run-")]
    assert rc == 2, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last == f"error: MLflow tracking server {url} is unreachable: [Errno 111] Connection refused", last
    # the task's own retries ran (3 retries with backoff: 4 attempts), then the flow failed
    assert len(open_run) == 1 and open_run[0].run_count == 4 and open_run[0].state.type.value == "FAILED"
    # nothing was trained or registered anywhere: no run folder (only the cached ingest and index results
    # that runs_dir keeps), no local tracking store
    assert {p.name for p in (home / "runs").glob("*")} <= {"prefect-results"} and not (home / "mlflow.db").exists()
    record("MLflow tracking server down (closed loopback port)", "open-run",
           "retried by the task (4 attempts, backoff 2-4-8 s by default), then `error: MLflow tracking server ... is unreachable`, exit 2; nothing trained or registered")


def test_lancedb_folder_not_writable_names_the_path(tmp_path):
    if os.geteuid() == 0:
        # root writes through any mode bits: make the folder impossible instead (a path under a file)
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a regular file")
        uri = str(blocker / "lancedb")
        how = "root: path under a regular file"
    else:
        folder = tmp_path / "lancedb"
        folder.mkdir()
        folder.chmod(0o500)
        uri = str(folder)
        how = "chmod 500"
    with pytest.raises(PermissionError) as err:
        vectors.write_image_features(uri, ["a" * 64], "pixels", np.zeros((1, 4), np.float32))
    assert uri in str(err.value)
    record(f"LanceDB folder not writable ({how})", "index", f"`PermissionError: {str(err.value).replace(uri, '<uri>')}`")


# The real CLI with one library call replaced, as a disk or a model would fail.
def _enospc_on_third_checkpoint(monkeypatch) -> None:
    import pogdiff.checkpoints as t

    real, calls = t.save_file, []

    def save_file(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 3:  # the third checkpoint (step 12): the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(t, "save_file", save_file)


def _nan_at_step_10(monkeypatch) -> None:
    import pogdiff.methods as t

    real, calls = t.pogdiff_loss, []

    def pogdiff_loss(*a, **k):
        terms = real(*a, **k)
        calls.append(1)
        if len(calls) == 10:  # step 10: the loss becomes NaN
            terms = {**terms, "loss": terms["loss"] * float("nan")}
        return terms
    monkeypatch.setattr(t, "pogdiff_loss", pogdiff_loss)


def _retrain(config: Path, home: Path, prefect_api: str | None, capfd, source: Path) -> tuple[int, str]:
    result = run_cli(["retrain", str(source), "--config", str(config)], capfd, **cli_env(home, prefect_api))
    return result.returncode, result.output


def _checkpoint_ok(path: Path, step: int) -> None:
    assert json.loads((path / "manifest.json").read_text())["step"] == step
    weights = load_file(path / "unet.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    state = torch.load(path / "state.pt", weights_only=True)
    assert {"optimizer", "lr_sched", "rng"} <= set(state)


@pytest.mark.slow
def test_disk_full_while_writing_a_checkpoint(prefect_api, tiny, tmp_path, capfd, monkeypatch):
    source, config, _ = tiny
    home = tmp_path / "home"
    _enospc_on_third_checkpoint(monkeypatch)
    rc, out = _retrain(config, home, prefect_api, capfd, source)
    assert rc != 0 and "No space left on device" in out, out[-3000:]
    (run,) = _runs(home)
    assert run.info.status == "FAILED"
    ckpts = home / "runs" / run.info.run_id / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000004", "step-00000008"]  # no half-written temp folder
    _checkpoint_ok(ckpts / "step-00000008", 8)
    record("disk full (ENOSPC) while writing a checkpoint", "train",
           "run FAILED; checkpoints of steps 4 and 8 intact and loadable, no partial folder left")


@pytest.mark.slow
def test_nan_loss_fails_the_run_and_keeps_the_last_good_checkpoint(prefect_api, tiny, tmp_path, capfd, monkeypatch):
    source, config, _ = tiny
    home = tmp_path / "home"
    _nan_at_step_10(monkeypatch)
    rc, out = _retrain(config, home, prefect_api, capfd, source)
    assert rc != 0 and "TrainingDiverged: loss is nan at step 10" in out, out[-3000:]
    (run,) = _runs(home)
    assert run.info.status == "FAILED"
    ckpts = home / "runs" / run.info.run_id / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000004", "step-00000008"]
    _checkpoint_ok(ckpts / "step-00000008", 8)
    assert not (home / "runs" / run.info.run_id / "model").exists()
    assert _mlflow(home).search_registered_models() == []
    record("NaN loss (injected at step 10)", "train",
           "`TrainingDiverged`; run FAILED; last good checkpoint (step 8) kept; no model saved or registered")


@pytest.mark.slow
def test_time_limit_stops_the_run_and_the_next_retrain_continues_it(prefect_api, tiny, tmp_path, capfd, caplog):
    source, config, _ = tiny
    home = tmp_path / "home"
    limited = tmp_path / "limited.yaml"
    spec = yaml.safe_load(config.read_text())
    spec["train"]["time_limit_minutes"] = 1e-6  # out of time after the first step
    limited.write_text(yaml.safe_dump(spec))
    rc, out = _retrain(limited, home, prefect_api, capfd, source)
    assert rc != 0 and "time_limit_minutes=1e-06 reached at step 1/40" in out, out[-3000:]
    (run,) = _runs(home)
    assert run.info.status == "KILLED" and run.data.tags["resumable"] == "true"
    ckpts = home / "runs" / run.info.run_id / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step-00000001"]

    # the same retrain without the limit continues that run from step 1 and finishes it
    rc, out = _retrain(config, home, prefect_api, capfd, source)
    assert rc == 0, out[-3000:]
    (again,) = _runs(home)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert "resumed from checkpoint at step 1" in caplog.text  # the train task's log (in process: pytest's handler)
    steps = [m.step for m in _mlflow(home).get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 41))  # every step logged once: step 1 was not trained again
    assert [v.run_id for v in _mlflow(home).search_model_versions(f"name = '{MODEL_NAME}'")] == [run.info.run_id]
    record("training time limit (train.time_limit_minutes) runs out", "train",
           "stops between steps with a checkpoint; run KILLED with `resumable=true`; the next retrain continues it from that step")


@pytest.mark.parametrize("bad, key", [({"train": {"steps": "many"}}, "train.steps"),
                                      ({"train": {"stepz": 3}}, "train.stepz"),
                                      ({"registry": {"gate": {"metric": 3}}}, "registry.gate.metric")])
def test_bad_config_stops_before_any_work(bad, key, tiny, tmp_path, capfd):
    source, _, _ = tiny
    home = tmp_path / "home"
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(bad))
    rc, out = _retrain(config, home, None, capfd, source)
    assert rc == 2 and out.startswith("error: ") and key in out and len(out.strip().splitlines()) == 1, out
    assert not (home / "dataset").exists() and not (home / "mlflow.db").exists() and not (home / "lancedb").exists()
    record(f"bad config ({key}: {'unknown key' if 'stepz' in key else 'wrong type'})", "before ingest",
           f"`{out.strip()}`, exit 2; no dataset, index or MLflow run written")

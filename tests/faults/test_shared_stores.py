"""Deployments that share stores: a retrain starting while an evaluate flow's run is open in the
same experiment leaves it alone, a RUNNING retrain run whose process is alive is left alone, and
only a retrain run whose process is really gone (a real process that has exited) is reaped."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from faultkit import record
from mlflow.tracking import MlflowClient

from storage.mlflow import connection, runs
from tasks.track import KIND_TAG, OWNER_TAG, RETRAIN_KEY_TAG, _crashed_run, owner, owner_alive

pytestmark = pytest.mark.slow  # servers, processes or whole flows: see pyproject's marker


def _dead_owner() -> str:
    """The owner tag of a real process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tag = owner(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    return tag


def test_retrain_reaps_only_its_own_kind_whose_process_is_gone(tmp_path):
    connection.configure(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = "shared"
    evaluation = runs.start(exp, run_name="evaluate-champion", tags={KIND_TAG: "evaluation", OWNER_TAG: _dead_owner()})
    live = runs.start(exp, run_name="live retrain", tags={KIND_TAG: "retrain", OWNER_TAG: owner(), RETRAIN_KEY_TAG: "other"})
    dead = _dead_owner()
    assert owner_alive(owner()) is True and owner_alive(dead) is False and owner_alive("elsewhere:1:2.00") is None
    crashed = runs.start(exp, run_name="crashed retrain", tags={KIND_TAG: "retrain", OWNER_TAG: dead, RETRAIN_KEY_TAG: "other"})
    same = runs.start(exp, run_name="crashed, same key", tags={KIND_TAG: "retrain", OWNER_TAG: dead, RETRAIN_KEY_TAG: "mine"})

    assert _crashed_run(exp, "mine", logging.getLogger("test")) == same  # resumed
    status = {r: MlflowClient().get_run(r).info.status for r in (evaluation, live, crashed, same)}
    assert status == {evaluation: "RUNNING", live: "RUNNING", crashed: "FAILED", same: "RUNNING"}
    record("evaluate flow (and a live retrain) RUNNING in the experiment when a retrain starts", "open-run",
           "left RUNNING: only retrain runs whose owner process is gone (host:pid:start time) are reaped or resumed")

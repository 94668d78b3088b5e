"""Tasks that open and close the MLflow run a retrain logs into."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess

import psutil

from prefect import get_client, get_run_logger, task
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run
from prefect.utilities.urls import url_for

from storage import vectors
from storage.links import redact_uri
from storage.mlflow import connection, descriptions, lineage, runs
from storage.settings import REPO_ROOT, Settings
from storage.training_set import DataVersion
from tasks.config import RetrainConfig
from tasks.describe import PREFECT_FLOW_RUN_URL_TAG, describe_run, experiment_text
from tasks.retry import IO_RETRIES

RETRAIN_ENTRYPOINT = "flows/retrain.py:retrain"  # as prefect.yaml names it: the run's "Source" in MLflow
EVALUATE_ENTRYPOINT = "flows/evaluate.py:evaluate_registered"


def _logger() -> logging.Logger | logging.LoggerAdapter:
    # The task's function also runs outside a flow (``open_run.fn`` in tests and notebooks).
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("pogdiff.track")


def git_commit() -> str | None:
    """The checkout's commit, or None outside a git checkout (an installed package)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def flow_run_tags() -> dict[str, str]:
    """``prefect_flow_run_id`` (``none`` outside a flow run) and, when the Prefect UI's address is
    known (``PREFECT_UI_URL``, or derived from ``PREFECT_API_URL``), the flow run's page as
    ``prefect_flow_run_url``, credentials removed."""
    run_id = flow_run.get_id()
    tags = {"prefect_flow_run_id": str(run_id or "none")}
    url = url_for("flow-run", obj_id=run_id) if run_id else None
    if url:
        tags[PREFECT_FLOW_RUN_URL_TAG] = redact_uri(url)
    return tags


@task(name="label-flow-run", **IO_RETRIES)
def label_flow_run(labels: dict[str, str]) -> list[str]:
    """Add ``<key>:<value>`` tags (e.g. ``model:pogdiff-demo``) to the flow run this task runs in,
    beside the tags it has, so runs can be found and filtered by them in the Prefect UI; returns its
    tags. Outside a flow run it does nothing (returns ``[]``)."""
    run_id = flow_run.get_id()
    if run_id is None:
        return []
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(run_id).tags
        tags = sorted(set(current) | {f"{key}:{value}" for key, value in labels.items()})
        if set(tags) != set(current):
            client.update_flow_run(run_id, tags=tags)
    return tags


def _lance_tables(uri: str, versions: dict[str, int] | None = None) -> dict[str, dict]:
    """Per LanceDB table: ``version``, ``rows``, ``uri`` and ``digest``, of the latest version or,
    for the tables ``versions`` names, of that version.

    A Lance version is immutable, so (table location, version, commit time) identifies the content;
    the commit time tells a re-created table's version 1 from the old one's.
    """
    db = vectors.connect(uri)
    out = {}
    for name in db.list_tables().tables:
        table = vectors.open_table(db, name, (versions or {}).get(name))
        version = table.version
        committed = next((v["timestamp"] for v in table.list_versions() if v["version"] == version), None)
        key = f"{table.uri}\n{version}\n{committed}"
        out[name] = {"version": version, "rows": table.count_rows(), "uri": table.uri,
                     "digest": hashlib.sha256(key.encode()).hexdigest()[:16]}
    return out


RETRAIN_KEY_TAG = "retrain_key"
KIND_TAG = "kind"  # retrain | evaluation: what opened the run (a run without one is a retrain's)
OWNER_TAG = "owner"  # host:pid:start time of the process that opened the run
RESUMED_TAG = "resumed_from_crash"
RESUMABLE_TAG = "resumable"  # on a KILLED run: stopped between steps with a checkpoint, to be continued


# How a training runs, not what it computes: a retry with a longer time limit or more processes
# (the same global batch) continues the same run.
_OPERATIONAL = {"time_limit_minutes", "num_processes"}


def split_config(config: RetrainConfig) -> tuple[dict, dict[str, str]]:
    """(the resolved config less the operational train knobs, those knobs as ``{"train.<k>": value}``).

    The first is what a run trains (its params, its key); the second may change between attempts
    of the same run and is logged as ``attempt.*`` tags (MLflow params cannot change).
    """
    resolved = config.model_dump(mode="json")
    operational = {f"train.{k}": str(resolved["train"].pop(k)) for k in sorted(_OPERATIONAL)}
    return resolved, operational


def retrain_key(config: RetrainConfig, snapshot_id: str) -> str:
    """sha256 of what is trained (``split_config``) and the dataset snapshot: the same key means the same training."""
    text = json.dumps({"config": split_config(config)[0], "snapshot_id": snapshot_id}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def owner(pid: int | None = None) -> str:
    """``host:pid:start`` of this process (or of process ``pid``): who opened a run, and whether it is
    still alive (``owner_alive``)."""
    return f"{socket.gethostname()}:{pid or os.getpid()}:{psutil.Process(pid).create_time():.2f}"


def owner_alive(tag: str | None) -> bool | None:
    """True / False when ``tag`` names a process of this host that is / is no longer running (a pid
    reused by another process counts as gone); None when it cannot be told (another host, no tag)."""
    try:
        host, pid, started = (tag or "").rsplit(":", 2)
        if host != socket.gethostname():
            return None
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started
    except psutil.NoSuchProcess:
        return False
    except (ValueError, psutil.Error):
        return None


def _crashed_run(experiment: str, key: str, log) -> str | None:
    """The run a crashed retrain with this key left RUNNING, to resume; other RUNNING retrain runs
    are marked FAILED (their config or data changed, so their checkpoints cannot continue).

    Only retrain runs are considered (an ``evaluate`` flow's run in the same experiment is never
    touched), and never one whose owner process is alive on this host. A run whose owner cannot be
    checked (another host) is taken as crashed: the deployments run one retrain per experiment at a
    time (``concurrency_limit: 1``), so a RUNNING retrain found when a retrain starts has no process left.
    """
    resumable = None
    for run_id, tags in runs.unfinished_runs(experiment):
        if tags.get(KIND_TAG, "retrain") != "retrain":
            continue
        if owner_alive(tags.get(OWNER_TAG)):
            log.warning("open-run: MLflow run %s is RUNNING in a live process (%s); left alone", run_id, tags[OWNER_TAG])
            continue
        if resumable is None and tags.get(RETRAIN_KEY_TAG) == key:
            resumable = run_id
            continue
        runs.set_tags(run_id, {"failed_reason": "left RUNNING by a crashed retrain; not resumable"})
        runs.end(run_id, "FAILED")
        log.warning("open-run: MLflow run %s was left RUNNING by a crashed retrain; marked FAILED", run_id)
    if resumable is None:  # a run stopped by the training time limit continues where it stopped
        stopped = [r for r, tags in runs.unfinished_runs(experiment, "KILLED")
                   if tags.get(RESUMABLE_TAG) == "true" and tags.get(RETRAIN_KEY_TAG) == key]
        if stopped:
            resumable = stopped[0]
            runs.set_tags(resumable, {RESUMABLE_TAG: "false"})
    return resumable


@task(name="open-run", **IO_RETRIES)
def open_run(settings: Settings, config: RetrainConfig, data: DataVersion) -> str:
    """Start the MLflow run, or resume the one a crashed retrain of the same config and snapshot
    left RUNNING (tag ``resumed_from_crash=true``; same run id, so the same run folder and the
    trainer continues from its last checkpoint). Logs the resolved config as params, lineage tags,
    MLflow's source tags (``runs.source_tags``), the Prefect flow run (``flow_run_tags``) and the data
    as inputs; every write repeats the same values, so a resumed run logs nothing new. Describes the
    run (what it trains on) and, once, its experiment (``tasks.describe``).

    Inputs (MLflow datasets): context ``training`` = the Parquet snapshot and the LanceDB tables
    the trainer reads (``captions`` with its neighbour graph, ``image_features``); context
    ``evaluation`` = the captions evaluation prompts are drawn from and the snapshot's real images
    (logged under their own names: MLflow keeps one input per dataset and run). All of them are
    ``data``: the pinned snapshot and the table versions the index wrote for it, which is what the
    train and evaluate tasks read.
    """
    log = _logger()
    connection.use(settings)
    connection.check_server()
    snapshot_id, num_rows = data.snapshot_id, data.rows
    tables = _lance_tables(settings.lancedb_uri, {vectors.CAPTIONS: data.captions_version,
                                                  vectors.IMAGE_FEATURES: data.features_version})
    missing = {vectors.CAPTIONS, vectors.IMAGE_FEATURES} - set(tables)
    if missing:
        raise FileNotFoundError(f"LanceDB at {redact_uri(settings.lancedb_uri)} has no table {sorted(missing)}; run the index stage first")
    captions, features = tables[vectors.CAPTIONS], tables[vectors.IMAGE_FEATURES]
    key = retrain_key(config, snapshot_id)
    tags = {
        **runs.source_tags(RETRAIN_ENTRYPOINT, git_commit()),
        **flow_run_tags(),
        "dataset_snapshot_id": snapshot_id,
        "lancedb_captions_version": str(captions["version"]),
        "lancedb_image_features_version": str(features["version"]),
        "base_model": config.train.base_model,
        "method": config.train.pog.method,
        RETRAIN_KEY_TAG: key,
        KIND_TAG: "retrain",
        OWNER_TAG: owner(),
    }
    run_id = _crashed_run(config.registry.experiment, key, log)
    if run_id is None:
        run_id = runs.start(config.registry.experiment, run_name=f"{config.train.pog.method}-{snapshot_id}", tags=tags)
    else:
        runs.set_tags(run_id, {**tags, RESUMED_TAG: "true"})
        log.warning("open-run: resuming MLflow run %s, left RUNNING by a crashed retrain of the same config "
                    "and snapshot; training continues from its last checkpoint", run_id)
    dataset = str(settings.dataset_uri)
    resolved, operational = split_config(config)
    runs.set_tags(run_id, {f"attempt.{k}": v for k, v in operational.items()})
    with runs.resume(run_id):
        runs.log_config(resolved)
        lineage.log_lineage(f"dataset@{snapshot_id}", dataset, snapshot_id, "training", num_rows)
        for name, t in ((vectors.CAPTIONS, captions), (vectors.IMAGE_FEATURES, features)):
            lineage.log_lineage(f"lancedb/{name}@v{t['version']}", redact_uri(t["uri"]), t["digest"], "training", t["rows"])
        lineage.log_lineage(f"eval-captions@lancedb-v{captions['version']}", redact_uri(captions["uri"]), captions["digest"],
                             "evaluation", captions["rows"])
        lineage.log_lineage(f"eval-references@{snapshot_id}", dataset, snapshot_id, "evaluation", num_rows)
    descriptions.describe_experiment_once(config.registry.experiment, experiment_text(config.registry.model_name))
    describe_run(settings, run_id)  # what it trains on; the register stage adds what became of it
    return run_id


@task(name="close-run", **IO_RETRIES)
def close_run(settings: Settings, run_id: str, failed: bool, resumable: bool = False) -> None:
    """FINISHED, FAILED, or KILLED with ``resumable=true`` (the next retrain of the same config and
    snapshot continues it from its checkpoint, e.g. after the training time limit)."""
    connection.use(settings)
    if resumable:
        runs.set_tags(run_id, {RESUMABLE_TAG: "true"})
        runs.end(run_id, "KILLED")
    else:
        runs.end(run_id, "FAILED" if failed else "FINISHED")

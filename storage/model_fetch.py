"""A registered model version as a local pipeline folder, for stages that evaluate it."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow

from storage.compare import resolve_run


def materialize(tracking_uri: str, ref: str, default_model: str, dest_root: Path) -> dict:
    """Load ``ref`` (``champion``, ``name@alias``, ``name/version``) and save it as a model folder.

    Goes through the logged pyfunc model, so a LoRA version is rebuilt from its base and adapter
    exactly as any user of the registry would get it. The folder is
    ``dest_root/<name>-v<version>/model``, written once and reused (a version never changes).
    Returns ``{"model_dir", "model", "version", "run_id", "metrics"}`` (the metrics its training run logged).
    """
    found = resolve_run(tracking_uri, ref, default_model)
    if found.version is None:
        raise ValueError(f"{ref!r} names a run, not a registered model version")
    target = Path(dest_root) / f"{found.model}-v{found.version}" / "model"
    if not target.is_dir():
        mlflow.set_tracking_uri(tracking_uri)
        pipe = mlflow.pyfunc.load_model(f"models:/{found.model}/{found.version}").unwrap_python_model().pipeline
        pipe.to("cpu")
        if target.parent.exists():
            shutil.rmtree(target.parent)  # a half-written earlier attempt
        pipe.save_pretrained(target)  # atomic: the folder appears complete or not at all
    return {"model_dir": str(target), "model": found.model, "version": found.version, "run_id": found.run_id,
            "metrics": dict(found.metrics)}

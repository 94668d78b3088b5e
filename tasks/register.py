"""Register task: log the model to the run, register a version, apply the promotion gate."""

from __future__ import annotations

import re
from pathlib import Path

from prefect import get_run_logger, task

from pogdiff.pipelines.base import ADAPTER_DIR  # the trainer saves a LoRA run's adapter there, beside the fused model
from storage import vectors
from storage.config import RegisterConfig
from storage.links import redact_uri
from storage.mlflow import connection, lineage, packaging, registry, runs
from storage.settings import Settings
from tasks.results import Registration
from tasks.retry import IO_RETRIES


def register_version(settings: Settings, cfg: RegisterConfig, model_dir: str, run_id: str) -> str:
    """The version of ``cfg.model_name`` that ``run_id`` registers: logged now, or reused when an
    earlier attempt of this task already registered it (a retry never adds a second version). The
    logged model behind it is linked to the run's dataset inputs (``lineage.link_models``).

    A LoRA run (``<run_dir>/lora`` beside ``<run_dir>/model``) logs only its adapter, with the
    base model the run's logged config names (param ``train.base_model``).
    """
    connection.use(settings)
    version = registry.version_of_run(cfg.model_name, run_id) or _log_version(settings, cfg, model_dir, run_id)
    lineage.link_models(run_id)
    return version


def _log_version(settings: Settings, cfg: RegisterConfig, model_dir: str, run_id: str) -> str:
    caps = vectors.read_caption_table(settings.lancedb_uri).sort_by([("count", "descending")])
    example_prompts = caps.column("caption").to_pylist()[:2]
    adapter = Path(model_dir).parent / ADAPTER_DIR
    base_model = runs.run_params(run_id)["train.base_model"] if adapter.is_dir() else None
    with runs.resume(run_id):
        return packaging.log_model(
            Path(model_dir),
            cfg.model_name,
            example_prompts,
            adapter_dir=adapter if base_model is not None else None,
            base_model=base_model,
        )


def champion_tag(model_name: str) -> str:
    """The LanceDB tag on the table versions the champion of ``model_name`` was trained on."""
    return "champion-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model_name)


def keep_champion_lineage(settings: Settings, model_name: str, run_id: str) -> str | None:
    """Move the champion's LanceDB tags to the table versions ``run_id`` recorded, so the champion's
    lineage resolves however old it gets (``vectors.tag_versions``).

    Returns None, or why the tags could not move (the promotion stands either way: the lineage then
    resolves for ``index.version_retention_days``).
    """
    tags = runs.run_tags(run_id)
    versions = {table: int(tags[tag]) for table, tag in ((vectors.CAPTIONS, "lancedb_captions_version"),
                                                         (vectors.IMAGE_FEATURES, "lancedb_image_features_version")) if tag in tags}
    if not versions:
        return f"run {run_id} records no LanceDB table versions"
    try:
        vectors.tag_versions(settings.lancedb_uri, versions, champion_tag(model_name))
    except (ValueError, RuntimeError, OSError) as err:  # table gone, version pruned, store unreachable
        return f"LanceDB at {redact_uri(settings.lancedb_uri)}: {err}"
    return None


@task(name="register", **IO_RETRIES)
def register_model(settings: Settings, cfg: RegisterConfig, model_dir: str, run_id: str, metrics: dict[str, float]) -> Registration:
    """The ``Registration``: the registry's ``PromotionDecision`` plus
    ``model_name``, ``run_id``, the previous champion's metrics ``champion_metrics`` (empty when none)
    and its run ``champion_run_id`` (None when none)."""
    connection.use(settings)
    before = registry.champion(cfg.model_name)
    version = register_version(settings, cfg, model_dir, run_id)
    decision = registry.promote(cfg.model_name, version, metrics, cfg.gate)
    get_run_logger().info("register: %s version %s — %s", cfg.model_name, version, decision.reason)
    if decision.promoted and (problem := keep_champion_lineage(settings, cfg.model_name, run_id)):
        get_run_logger().warning("register: the champion's data versions are not tagged (%s)", problem)
    return Registration(**dict(decision), model_name=cfg.model_name, run_id=run_id,
                        champion_metrics=before[1] if before else {},
                        champion_run_id=registry.version_run_id(cfg.model_name, before[0]) if before else None)

"""Prefect cache keys for the stages whose output is fully determined by their inputs.

Ingest is keyed by (source fingerprint, ingest config, dataset store); the index tasks by (dataset
snapshot, index config, both stores). A retrain over unchanged data therefore shows ingest and index
as ``Cached`` and goes straight to training. Training and registration are never cached: each run
is a new model. ``PREFECT_TASKS_REFRESH_CACHE=true`` forces every cached stage to run again.

Results are persisted as JSON (never pickle) under ``<runs_dir>/prefect-results``: beside the runs, on
the volume workers share (a team's), so a worker on another host finds what another cached.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from storage.fingerprint import source_fingerprint, store_generation
from storage.settings import Settings

# Part of every key. Bump it when a cached task's result changes shape: an entry stored by older code
# (2: the index tasks return tasks.results models, where they returned dicts) is then never found,
# instead of being handed to code that reads the new shape.
RESULT_VERSION = 2


def _key(*parts: Any) -> str:
    def plain(p: Any) -> Any:
        return p.model_dump(mode="json") if isinstance(p, BaseModel) else str(p)

    return hashlib.sha256(json.dumps([RESULT_VERSION, *(plain(p) for p in parts)], sort_keys=True).encode()).hexdigest()


def ingest_key(context, parameters: dict[str, Any]) -> str:
    settings: Settings = parameters["settings"]
    return _key(
        "ingest",
        source_fingerprint(parameters["source"]),
        parameters["cfg"],
        settings.dataset_uri,
        store_generation(settings.dataset_uri),
    )


def index_key(context, parameters: dict[str, Any]) -> str:
    settings: Settings = parameters["settings"]
    return _key(
        context.task.name,
        parameters["snapshot_id"],
        parameters["cfg"],
        settings.dataset_uri,
        store_generation(settings.dataset_uri),
        settings.lancedb_uri,
        store_generation(settings.lancedb_uri),
    )


def cached(task, key_fn, settings: Settings):
    """``task`` with its cache key, persisted JSON results and the result folder under settings' runs_dir."""
    return task.with_options(
        cache_key_fn=key_fn,
        persist_result=True,
        result_storage=Path(settings.runs_dir) / "prefect-results",
        result_serializer="json",
    )

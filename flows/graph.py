"""The rebuild-graph flow: the whole ANN caption graph of the stored captions recomputed, its query
phase mapped over row shards on the task runner (``tasks/graph_query.py``).

The index stage of ingest and retrain keeps the graph current on its own, updating it incrementally;
this flow is for a full rebuild at a scale one process would take too long for (a first build from
embedded captions, or after changing the ANN settings): with ``POGDIFF_TASK_RUNNER=dask`` and a
scheduler address the shards run on that cluster's workers, which read the stored index and their
rows from the LanceDB location themselves, so it must be storage they all see.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, unmapped

from flows.runners import task_runner
from storage.settings import load_settings
from tasks.config import RetrainConfig, resolve_config
from tasks.graph_query import plan_graph_query, query_graph_shard, write_queried_graph
from tasks.results import GraphReport


@flow(name="rebuild-graph", log_prints=True, task_runner=task_runner())
def rebuild_graph(config: str | RetrainConfig = RetrainConfig(), overrides: dict[str, Any] | None = None) -> GraphReport:
    """Rebuild the caption graph with the ``index`` section of ``config``: plan (pin the table version,
    make sure the stored index matches it), ``query-graph-shard`` tasks mapped over the runner, and the
    refined graph written. Returns the write's report (``workers``: which processes ran the shards)."""
    settings = load_settings()
    cfg = resolve_config(config, overrides, settings.configs_dir).index
    plan = plan_graph_query(settings, cfg)
    parts = query_graph_shard.map(unmapped(settings), unmapped(cfg), unmapped(plan.version), unmapped(plan.generation), plan.shards)
    return write_queried_graph(settings, cfg, plan, parts)

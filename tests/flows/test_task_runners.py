"""Scale-out: the ingest flow maps caption-embedding shards, and the rebuild-graph flow the graph's
query phase, over a real Dask cluster."""

import os
from dataclasses import replace

import lancedb
import numpy as np
import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows.runners import task_runner
from pogdiff import knn
from pogdiff.demo import folder
from pogdiff.index import CaptionGraph, with_graph
from pogdiff.text import load_text_encoder
from storage import ann_index, vectors
from storage.settings import load_settings
from tasks.config import parse_config
from tasks.graph_query import plan_query


@pytest.fixture(scope="module")
def dask_address():
    """A real local Dask cluster of 2 worker processes, started once for this module's flows (which
    reach it by address, as a deployment would reach a shared cluster)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def test_runner_follows_settings(tmp_path):
    assert isinstance(task_runner(load_settings(home=tmp_path)), ThreadPoolTaskRunner)
    assert isinstance(task_runner(load_settings(home=tmp_path, task_runner="dask")), DaskTaskRunner)


@pytest.mark.slow
def test_embedding_shards_run_on_dask_workers(prefect_server, dask_address, tmp_path, monkeypatch):
    source = tmp_path / "source"
    folder.generate_longtail(source, seed=2, size=16, max_count=4, alpha=1.0, min_count=1, captions="individual")  # 24 captions
    monkeypatch.setenv("POGDIFF_HOME", str(tmp_path / "home"))
    from flows.ingest import ingest_source

    runner = task_runner(load_settings(task_runner="dask", task_runner_address=dask_address))
    flow = ingest_source.with_options(task_runner=runner)
    state = flow(str(source), parse_config({"index": {"k": 3, "embed_shard_size": 10}}), return_state=True)
    result = state.result()
    assert result.captions.report.captions == 24 and result.captions.report.embedded == 24

    with get_client(sync_client=True) as api:
        runs = api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    shards = [r for r in runs if r.name.startswith("embed-shard")]
    assert len(shards) == 3 and all(r.state.name == "Completed" for r in shards)

    # the vectors the workers computed are the encoder's own
    table = lancedb.connect(str(tmp_path / "home" / "lancedb")).open_table("captions").to_arrow()
    captions = table.column("caption").to_pylist()
    stored = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    expected = load_text_encoder().embed(captions).numpy()
    np.testing.assert_allclose(stored, expected, atol=1e-5)


def _shard_runs(state) -> list:
    with get_client(sync_client=True) as api:
        runs = api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return [r for r in runs if r.name.startswith("query-graph-shard")]


@pytest.mark.slow
def test_the_graph_query_phase_maps_over_row_shards_on_dask_workers(prefect_server, dask_address, tmp_path, monkeypatch):
    monkeypatch.setenv("POGDIFF_HOME", str(tmp_path / "home"))
    uri = load_settings().lancedb_uri  # a folder both workers see, as shared storage would be
    config = parse_config({"index": {"k": 5, "ann_threshold": 100, "graph_shard_rows": 1000}})
    cfg = config.index
    rng = np.random.default_rng(0)
    x = rng.standard_normal((313, 32)).astype(np.float32)[rng.integers(0, 313, 2500)] + 0.2 * rng.standard_normal((2500, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"c{i:05d}" for i in range(2500)]
    captions = CaptionGraph(ids=ids, captions=ids, vectors=x, counts=rng.integers(1, 20, 2500), nb_index=np.zeros((2500, 0), np.int64),
                            nb_sims=np.zeros((2500, 0), np.float32), density=np.ones(2500), embedded=2500, embedder="test", mode="none")
    vectors.write_caption_graph(uri, with_graph(captions, cfg), cfg)  # the stored captions, with an exact graph, no index

    from flows.graph import rebuild_graph

    runner = task_runner(load_settings(task_runner="dask", task_runner_address=dask_address))
    state = rebuild_graph.with_options(task_runner=runner)(config, return_state=True)
    out = state.result()
    assert out.index == "built: none stored" and out.graph_update == "full: rebuilt, query phase in 3 shards"
    shards = _shard_runs(state)
    assert len(shards) == 3 and all(r.state.name == "Completed" for r in shards)
    # the shards were searched by worker processes, which read the stored index and their rows themselves
    assert out.workers and all(not w.endswith(f":{os.getpid()}") for w in out.workers)

    # the same graph as the local single-process query of the stored index over the stored rows
    stored = vectors.read_caption_graph(uri, "test", cfg)
    assert stored.mode == "ann" and sorted(stored.ids) == ids
    index = ann_index.read_ann_index(uri, cfg)[0]
    hits, sims = knn.search(index.index, stored.vectors, cfg.ann_candidates + 1)
    row = {caption: i for i, caption in enumerate(stored.ids)}
    local = with_graph(replace(stored, vectors=stored.vectors.copy(), counts=stored.counts.copy()), cfg, np.array([row.get(c, -1) for c in index.slots] + [-1])[hits], sims)
    np.testing.assert_array_equal(stored.nb_index, local.nb_index)
    np.testing.assert_allclose(stored.density, local.density, rtol=1e-6)
    assert plan_query(load_settings(), cfg).index == "reused"  # index and table match now: the next plan keeps it

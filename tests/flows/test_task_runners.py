"""Scale-out: the ingest flow maps caption-embedding shards over a real Dask cluster."""

import lancedb
import numpy as np
import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows.runners import task_runner
from pogdiff.demo import catalogue
from pogdiff.text import load_text_encoder
from storage.settings import load_settings
from tasks.config import parse_config


def test_runner_follows_settings(tmp_path):
    assert isinstance(task_runner(load_settings(home=tmp_path)), ThreadPoolTaskRunner)
    assert isinstance(task_runner(load_settings(home=tmp_path, task_runner="dask")), DaskTaskRunner)


@pytest.mark.slow
def test_embedding_shards_run_on_dask_workers(prefect_server, tmp_path, monkeypatch):
    source = tmp_path / "source"
    catalogue.generate_longtail(source, seed=2, size=16, max_count=4, alpha=1.0, min_count=1, captions="individual")  # 24 captions
    monkeypatch.setenv("POGDIFF_HOME", str(tmp_path / "home"))
    from flows.ingest import ingest_source

    runner = task_runner(load_settings(task_runner="dask", task_runner_workers=2))
    flow = ingest_source.with_options(task_runner=runner)
    state = flow(str(source), parse_config({"index": {"k": 3, "embed_shard_size": 10}}), return_state=True)
    result = state.result()
    assert result["captions"]["captions"] == 24 and result["captions"]["embedded"] == 24

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

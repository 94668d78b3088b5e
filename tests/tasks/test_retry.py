"""The IO tasks' retry policy on a real Prefect server: bad input fails at once, one attempt.

(A store that is down is retried: tests/faults/test_outside.py counts four attempts of open-run.)
"""

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from storage.items import SourceError


def test_a_missing_source_is_not_retried(prefect_server, tmp_path, monkeypatch):
    monkeypatch.setenv("POGDIFF_HOME", str(tmp_path / "home"))
    from flows.ingest import ingest_source

    missing = tmp_path / "no-such-source"
    state = ingest_source(str(missing), return_state=True)
    assert state.is_failed()
    with pytest.raises(SourceError, match=f"source folder not found: {missing}"):
        state.result()
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    (ingest,) = [t for t in tasks if t.name.startswith("ingest-")]
    assert ingest.state.type.value == "FAILED" and ingest.run_count == 1  # no retry: waiting cannot make it appear

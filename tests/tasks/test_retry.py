"""The IO tasks' retry policy on a real Prefect server: bad input fails at once, one attempt.

(A store that is down is retried: tests/faults/test_outside.py counts four attempts of open-run.)
"""

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.deployments import load_specs
from storage.items import SourceError


@pytest.mark.slow  # a whole flow on the session's Prefect server
def test_a_missing_source_fails_the_run_at_its_first_task_once(prefect_server, tmp_path, monkeypatch):
    # retrain-nightly with prefect.yaml's own parameters, on a home without the demo catalogue
    monkeypatch.setenv("POGDIFF_HOME", str(tmp_path / "home"))
    spec = next(s for s in load_specs() if s.name == "retrain-nightly")
    state = spec.flow()(**spec.parameters, return_state=True)
    missing = tmp_path / "home" / "data" / "demo-catalogue"  # the relative source, under POGDIFF_HOME's data root
    assert state.is_failed()
    with pytest.raises(SourceError, match=f"^source folder not found: {missing}$"):
        state.result()
    assert state.message.endswith(f"source folder not found: {missing}"), state.message
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    assert flow_run.run_count == 1  # the flow is not retried either
    (ingest,) = tasks  # the first task, and nothing after it
    assert ingest.name.startswith("ingest-") and ingest.state.type.value == "FAILED"
    assert ingest.run_count == 1  # no retry: waiting cannot make it appear

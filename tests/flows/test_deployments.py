"""prefect.yaml: every deployment's entrypoint imports and its parameters validate against the flow."""

from prefect.flows import Flow

from flows.cli_serve import overrides
from flows.deployments import load_specs, to_runner_deployment
from tasks.config import parse_config
from tasks.track import EVALUATE_ENTRYPOINT, RETRAIN_ENTRYPOINT


def test_deployments_entrypoints_and_parameters():
    specs = load_specs()
    assert {"retrain-nightly", "ingest-hourly", "evaluate-champion", "retrain-gpu"} <= {s.name for s in specs}
    for spec in specs:
        flow = spec.flow()
        assert isinstance(flow, Flow), spec.name
        # raises on an unknown parameter or a config that does not validate
        flow.validate_parameters(spec.parameters)
        if spec.schedule:
            assert spec.concurrency_limit == 1, f"{spec.name}: scheduled runs must never overlap"
        assert spec.work_pool in ("local", "gpu"), spec.name
    # the runs' MLflow "Source" names the deployments' entrypoints
    assert {RETRAIN_ENTRYPOINT, EVALUATE_ENTRYPOINT} <= {s.entrypoint for s in specs}


def test_a_bad_parameter_in_a_deployment_is_rejected():
    spec = next(s for s in load_specs() if s.name == "retrain-nightly")
    bad = {**spec.parameters, "config": {"train": {"stepz": 3}}}
    try:
        spec.flow().validate_parameters(bad)
    except Exception as err:  # Prefect's ParameterTypeError wraps pydantic's message
        assert "stepz" in str(err)
    else:
        raise AssertionError("an unknown config key passed Prefect's parameter validation")


def test_serve_builds_scheduled_deployments_with_overrides():
    specs = {s.name: s for s in load_specs()}
    config = parse_config({"train": {"steps": 7}, "index": {"k": 2}})
    retrain = specs["retrain-nightly"]
    dep = to_runner_deployment(retrain, overrides(retrain.flow(), "some/source", config))
    assert dep.parameters["source"] == "some/source"
    assert dep.parameters["config"]["train"]["steps"] == 7
    assert dep.concurrency_limit == 1 and dep.schedules and dep.schedules[0].schedule.cron == "0 3 * * *"
    ingest = specs["ingest-hourly"]
    dep = to_runner_deployment(ingest, overrides(ingest.flow(), None, config))
    assert dep.parameters["source"] == ingest.parameters["source"]
    assert dep.parameters["index_config"]["k"] == 2 and "ingest_config" in dep.parameters
    assert dep.schedules[0].schedule.interval.total_seconds() == 3600

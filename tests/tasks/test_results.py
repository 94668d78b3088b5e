"""The typed results of tasks and flows: they refuse what they do not describe, and survive the trips
they make (pickled to Dask workers and back, JSON in Prefect's result store)."""

import pickle

import numpy as np
import pytest
from prefect.serializers import JSONSerializer
from pydantic import ValidationError

from storage.gate import GateCheck, PromotionDecision
from storage.parquet import IngestReport
from storage.training_set import DataVersion
from tasks.results import (
    CachedCaptionIndex,
    CachedImageFeatures,
    CachedIngest,
    CaptionIndexReport,
    ImageFeatureReport,
    Prepared,
    QueryShard,
    Registration,
    RetrainResult,
    Snapshot,
)

CAPTIONS = CaptionIndexReport(snapshot_id="s1", captions=5, embedded=2, reused=3, embedder="clip", mode="exact", k=3, edges=15,
                              graph_update="incremental", recomputed=2, patched=0, written=5, deleted=0, version=4,
                              ann_index=False, seconds=0.25)
INGEST = IngestReport(accepted=5, unchanged=0, rejected={}, snapshot_id="s1", total_rows=5, batch_id="b1", source_kind="folder",
                      manifest="snapshots/s1.json")


def _prepared() -> Prepared:
    return Prepared(ingest=CachedIngest(report=INGEST, cached=False), snapshot=Snapshot(snapshot_id="s1", rows=5),
                    captions=CachedCaptionIndex(report=CAPTIONS, cached=True),
                    images=CachedImageFeatures(report=ImageFeatureReport(snapshot_id="s1", extractor="pixels", computed=0,
                                                                         reused=5, version=2), cached=True),
                    data=DataVersion(snapshot_id="s1", rows=5, captions_version=4, features_version=2))


def test_a_result_rejects_an_unknown_field_and_a_wrong_type():
    with pytest.raises(ValidationError, match="extra_forbidden"):
        Snapshot(snapshot_id="s1", rows=5, cached=True)
    with pytest.raises(ValidationError, match="rows"):
        Snapshot(snapshot_id="s1", rows="many")
    with pytest.raises(ValidationError, match="report"):
        CachedIngest(report=CAPTIONS, cached=False)  # another stage's report
    with pytest.raises(ValidationError, match="frozen"):
        Snapshot(snapshot_id="s1", rows=5).rows = 6


def test_the_cached_wrappers_pickle_and_round_trip():
    prepared = _prepared()
    back = pickle.loads(pickle.dumps(prepared))
    assert back == prepared and type(back.captions) is CachedCaptionIndex and back.captions.report.version == 4
    assert Prepared.model_validate_json(prepared.model_dump_json()) == prepared


def test_a_cached_report_reads_back_from_prefects_json_store():
    """Prefect persists the cached tasks' results with its JSON serializer and decodes them by class name."""
    serializer = JSONSerializer()
    assert serializer.loads(serializer.dumps(CAPTIONS)) == CAPTIONS


def test_a_query_shard_with_numpy_arrays_pickles():
    shard = QueryShard(ids=["a", "b"], hits=np.array([[0, 1], [1, -1]], np.int64), sims=np.array([[1.0, 0.5], [1.0, -np.inf]], np.float32),
                       worker="host:1")
    back = pickle.loads(pickle.dumps(shard))
    assert back.ids == ["a", "b"] and back.worker == "host:1"
    np.testing.assert_array_equal(back.hits, shard.hits)
    assert back.sims.dtype == np.float32 and np.array_equal(back.sims, shard.sims)
    with pytest.raises(ValidationError, match="hits"):
        QueryShard(ids=["a"], hits=[[0, 1]], sims=shard.sims, worker="host:1")  # a list, not an array


def test_a_registration_is_the_decision_and_the_champion_it_was_weighed_against():
    check = GateCheck(role="metric", new=0.6, champion=0.5, change=0.1, limit=0.01, status="passed")
    decision = PromotionDecision(promoted=True, version="2", champion_before="1", decided_by="gate", reason="gain",
                                 checks={"few/grecall": check})
    reg = Registration(**dict(decision), model_name="m", run_id="r2", champion_metrics={"few/grecall": 0.5}, champion_run_id="r1")
    assert isinstance(reg, PromotionDecision)
    assert reg.model_dump(include=set(PromotionDecision.model_fields)) == decision.model_dump()
    assert reg.checks["few/grecall"] == check
    with pytest.raises(ValidationError, match="champion_run_id"):
        Registration(**dict(decision), model_name="m", run_id="r2", champion_metrics={})
    with pytest.raises(ValidationError, match="frozen"):
        decision.promoted = False  # type: ignore[misc]
    with pytest.raises(ValidationError, match="gate_passed"):
        PromotionDecision(promoted=True, version="2", champion_before=None, decided_by="gate", reason="x", gate_passed=True)
    result = RetrainResult(**dict(_prepared()), run_id="r2", model_dir="/runs/r2/model", metrics={"few/grecall": 0.6}, decision=reg)
    assert pickle.loads(pickle.dumps(result)) == result
    assert result.model_dump(mode="json")["decision"]["checks"]["few/grecall"]["status"] == "passed"
    assert RetrainResult.model_validate_json(result.model_dump_json()) == result
    serializer = JSONSerializer()
    assert serializer.loads(serializer.dumps(reg)) == reg and type(serializer.loads(serializer.dumps(reg))) is Registration

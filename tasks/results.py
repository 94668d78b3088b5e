"""What the tasks and flows return: typed, frozen values that readers take attributes of.

Every model rejects unknown fields and wrong types, so a value of another shape fails where it is
made, not where a reader takes a missing attribute. ``metrics`` fields stay plain dicts: metric
name -> value.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from storage.gate import PromotionDecision
from storage.parquet import IngestReport
from storage.training_set import DataVersion


class _Result(BaseModel):
    """The base of every result: frozen, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Snapshot(_Result):
    """The dataset snapshot a flow run pinned, and its row count."""

    snapshot_id: str
    rows: int


class CaptionIndexReport(_Result):
    """What one caption index run did: embedding, the neighbour graph and the LanceDB write."""

    snapshot_id: str | None  # the snapshot indexed; None: the dataset as it was when the run read it
    captions: int
    embedded: int
    reused: int
    embedder: str
    mode: str
    k: int
    edges: int
    graph_update: str  # "incremental", or "full: <why>"
    recomputed: int  # rows whose neighbours were searched anew
    patched: int  # rows whose stored top-k or density was patched
    written: int
    deleted: int
    version: int  # the captions table version that holds exactly this graph
    ann_index: bool  # whether the vector column has an ANN index
    seconds: float


class ImageFeatureReport(_Result):
    """What one image feature run did."""

    snapshot_id: str | None  # as in CaptionIndexReport
    extractor: str
    computed: int
    reused: int
    version: int  # the image features table version written


R = TypeVar("R", bound=BaseModel)


class Cached(_Result, Generic[R]):
    """A cached stage's report, and whether this run took it from Prefect's cache."""

    report: R
    cached: bool


# One subclass per stage rather than Cached[...] in the fields: a parametrized generic pickles
# only when pydantic happened to create it at module level, a named subclass always does.
class CachedIngest(Cached[IngestReport]):
    """The ingest stage's report, cached or not."""


class CachedCaptionIndex(Cached[CaptionIndexReport]):
    """The caption index stage's report, cached or not."""


class CachedImageFeatures(Cached[ImageFeatureReport]):
    """The image feature stage's report, cached or not."""


class Prepared(_Result):
    """The stages every flow starts with (``flows/prepare.py``) and the data version they pinned."""

    ingest: CachedIngest
    snapshot: Snapshot
    captions: CachedCaptionIndex
    images: CachedImageFeatures
    data: DataVersion  # what training and evaluation read, and the run records as its lineage


class Registration(PromotionDecision):
    """The register task's outcome: the registry's promotion decision, and the champion it was
    weighed against. Frozen, unknown fields rejected, as every result."""

    model_name: str
    run_id: str
    champion_metrics: dict[str, float]  # the previous champion's; empty when there was none
    champion_run_id: str | None


class RetrainResult(Prepared):
    """The retrain flow's outcome: the prepared data, the run, its model folder, metrics and registration."""

    run_id: str
    model_dir: str
    metrics: dict[str, float]
    decision: Registration


class FetchedModel(_Result):
    """A registered model version saved as a local model folder, with what its training run logged."""

    model_dir: str
    model: str
    version: str
    run_id: str  # the training run
    metrics: dict[str, float]  # as the training run logged them


class EvaluationResult(_Result):
    """The evaluate flow's outcome: a registered version's metrics now, beside the same ones at training."""

    run_id: str  # the evaluation run
    model: str
    version: str
    metrics: dict[str, float]
    at_training: dict[str, float]


class TrialRun(_Result):
    """One finished tune trial: its knobs, validation metrics, child MLflow run and wall seconds."""

    number: int  # -1: the lam = 0 reference
    knobs: dict[str, Any]
    metrics: dict[str, float]
    run_id: str
    seconds: float


class Chosen(_Result):
    """The trial the tune chose."""

    trial: int  # -1: the lam = 0 reference
    knobs: dict[str, Any]
    score: float


class TuneResult(_Result):
    """The tune flow's outcome: the choice, the trials, and where the chosen retrain config is."""

    key: str  # the study's key (``tasks.tune.tune_key``)
    parent_run_id: str
    chosen: Chosen
    reference_score: float
    trials: int
    out_of_time: bool  # stopped by tune.time_limit_minutes
    tuned_config: str
    table: str  # the trials table, markdown


class QueryPlan(_Result):
    """A sharded graph query's plan: the pinned captions table, the stored index and the row shards."""

    version: int  # of the captions table
    generation: str  # of the stored index
    rows: int
    index: str  # "reused", or "built: <why>"
    shards: list[list[int]]  # [start, stop] row ranges


class QueryShard(_Result):
    """One shard's ANN candidates; crosses task-runner workers, so it must pickle."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    ids: list[str]  # the shard's caption ids, table order
    hits: np.ndarray  # [rows, L + 1] vector ids of the stored index, -1: none
    sims: np.ndarray  # [rows, L + 1] their cosines
    worker: str  # host:pid that searched them


class GraphReport(_Result):
    """What a full rebuild of the caption graph from sharded queries did."""

    captions: int
    mode: str
    k: int
    edges: int
    graph_update: str
    index: str  # as in QueryPlan
    recomputed: int
    patched: int
    workers: list[str]  # host:pid of every process that ran a shard
    written: int
    deleted: int
    version: int  # the captions table version written
    seconds: float

"""Dataset lineage of a run: which dataset snapshot and LanceDB table versions it read, recorded as
MLflow dataset inputs (name, digest, source URI, row count) without reading any data; read back for
the reviewer's descriptions, and linked to the model the run logged."""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE  # the longest digest MLflow stores

from storage.mlflow.runs import require_run


class _UriSource(DatasetSource):
    """Source of a dataset whose URI no registered MLflow source understands (e.g. a LanceDB table)."""

    def __init__(self, uri: str):
        self._uri = uri

    @staticmethod
    def _get_source_type() -> str:
        return "uri"

    def load(self, **kwargs: Any) -> str:
        raise NotImplementedError(f"MLflow cannot load {self._uri!r}; open it with the project's storage code")

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> "_UriSource":
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self._uri}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> "_UriSource":
        return cls(source_dict["uri"])


class _LineageDataset(MetaDataset):
    """A dataset recorded by name, digest, source and row count, without reading its data."""

    def __init__(self, source: DatasetSource, name: str, digest: str, num_rows: int):
        self._num_rows = num_rows
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, int]:
        return {"num_rows": self._num_rows}

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        config["profile"] = json.dumps(self.profile)
        return config


def _dataset_source(uri: str) -> DatasetSource:
    try:
        with warnings.catch_warnings():
            # MLflow registers the local artifact source twice and warns that a local path "can be
            # interpreted in multiple ways" (both are the same class); nothing to act on.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            return resolve_dataset_source(uri)
    except MlflowException:
        return _UriSource(uri)


def log_lineage(name: str, source_uri: str, digest: str, context: str, num_rows: int) -> None:
    """Record a dataset input of the active run: name, digest, source URI, row count, context.

    Uses ``mlflow.log_input`` with a metadata-only dataset (``MetaDataset``), so nothing is read from
    ``source_uri``. ``context`` is e.g. ``"training"`` or ``"evaluation"``. MLflow keeps at most
    36 characters of digest; a longer digest (a full sha256) is stored as its prefix, and whole
    in the input tag ``digest``.
    """
    require_run("log_lineage")
    if not name or not digest or not context:
        raise ValueError(f"log_lineage needs a name, digest and context; got {name!r}, {digest!r}, {context!r}")
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    dataset = _LineageDataset(_dataset_source(source_uri), name, digest[:MAX_DATASET_DIGEST_SIZE], int(num_rows))
    mlflow.log_input(dataset, context=context, tags={"digest": digest, "num_rows": str(int(num_rows))})


@dataclass(frozen=True)
class Input:
    """One dataset input of a run, as ``log_lineage`` recorded it (``digest`` as MLflow stores it)."""

    name: str
    context: str
    rows: int | None
    source: str
    digest: str


def run_inputs(run_id: str) -> list[Input]:
    """The dataset inputs of ``run_id`` in the order they were logged."""
    out = []
    for d in MlflowClient().get_run(run_id).inputs.dataset_inputs:
        tags = {t.key: t.value for t in d.tags}
        try:
            source = str(json.loads(d.dataset.source).get("uri", d.dataset.source))
        except (ValueError, AttributeError):  # a source another tool logged, not a JSON mapping
            source = d.dataset.source
        rows = json.loads(d.dataset.profile).get("num_rows") if d.dataset.profile else None
        out.append(Input(d.dataset.name, tags.get("mlflow.data.context", ""), rows, source, d.dataset.digest))
    return out


def rows_metric(item: Input) -> str:
    """``data/<context>/<name before @>/rows``: the metric that ties ``item`` to a logged model."""
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "-", f"data/{item.context or 'input'}/{item.name.split('@', 1)[0]}/rows")


def link_models(run_id: str) -> list[str]:
    """Show the run's dataset inputs on every model the run logged ("Datasets used" in the UI).

    MLflow lists a logged model's datasets from its metrics, each metric value tied to one dataset;
    so every input gets one metric, its row count (``rows_metric``), logged to the run and the
    model with that dataset's name and digest. Inputs already linked are skipped, so a retried
    register links nothing twice. Returns the metric keys logged now.
    """
    client = MlflowClient()
    run = client.get_run(run_id)
    keys = []
    for output in run.outputs.model_outputs if run.outputs else []:
        linked = {(m.dataset_name, m.dataset_digest) for m in client.get_logged_model(output.model_id).metrics or []}
        now = int(time.time() * 1000)
        metrics = [Metric(rows_metric(i), float(i.rows or 0), now, 0, model_id=output.model_id, dataset_name=i.name,
                          dataset_digest=i.digest, run_id=run_id)
                   for i in run_inputs(run_id) if (i.name, i.digest) not in linked]
        if metrics:
            client.log_batch(run_id, metrics=metrics)
        keys += [m.key for m in metrics]
    return keys

"""The dataset's current snapshot: what every later stage of a flow run is keyed and logged by."""

from __future__ import annotations

from prefect import task

from storage import dataset
from storage.settings import Settings
from tasks.results import Snapshot
from tasks.retry import IO_RETRIES


@task(name="dataset-snapshot", **IO_RETRIES)
def dataset_snapshot(settings: Settings) -> Snapshot:
    """The ``Snapshot`` (id, rows) of the Parquet dataset as it is now, pinned (``dataset.pin_snapshot``):
    every later stage of the flow run reads exactly these rows, whatever is ingested meanwhile.

    Read after ingest rather than taken from the ingest report, because a cached ingest report can
    predate rows another source added to the same dataset since.
    """
    snapshot, rows = dataset.pin_snapshot(settings.dataset_uri)
    return Snapshot(snapshot_id=snapshot, rows=rows)

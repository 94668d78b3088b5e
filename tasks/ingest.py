"""Ingest task: a caption–image source (folder + captions file, Parquet, WebDataset shards) into the Parquet dataset."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from storage import parquet
from storage.config import IngestConfig
from storage.settings import Settings
from tasks.retry import IO_RETRIES


@task(name="ingest", **IO_RETRIES)
def ingest(source: str, settings: Settings, cfg: IngestConfig) -> parquet.IngestReport:
    """Validate and append new rows; rejected rows go to the quarantine. Re-runs write nothing new."""
    report = parquet.ingest(Path(source), settings.dataset_uri, cfg)
    log = get_run_logger()
    if report.accepted == 0:
        log.info("ingest: no new rows (%d unchanged) — dataset snapshot %s reused", report.unchanged, report.snapshot_id)
    else:
        log.info("ingest: %d new rows, %d unchanged, snapshot %s", report.accepted, report.unchanged, report.snapshot_id)
    if report.rejected:
        log.warning("ingest: quarantined %s", report.rejected)
    return report

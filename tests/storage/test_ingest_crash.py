"""Crash injection and concurrency, with real processes.

An ingest subprocess (with its worker threads, or its spawned worker processes) is SIGKILLed at a
random moment after it has started writing parts: readers must see only complete parts with unique ids, and the next run must
complete the ingest. Two ingests of overlapping sources running at the same time must leave no
duplicate ids.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage.config import IngestConfig
from storage.dataset import DATASET_SCHEMA, QUARANTINE_SCHEMA, read_images, read_quarantine
from storage.parquet import ingest

ROOT = Path(__file__).resolve().parents[2]
CFG = IngestConfig(resolution=96)
N_IMAGES, EVERY_BAD = 400, 40  # every 40th input is a zero-byte file: 10 quarantined
CHILD = (
    "import sys; from pathlib import Path; from storage.config import IngestConfig; "
    "from storage.parquet import ingest; "
    "cfg = IngestConfig(resolution=96, parallelism=sys.argv[3]); "
    "r = ingest(Path(sys.argv[1]), Path(sys.argv[2]), cfg, workers=2, chunk_rows=8); "
    "print(r.model_dump_json())"
)


def _source(folder: Path, indices: range) -> Path:
    folder.mkdir(parents=True)
    lines = ["image,caption"]
    for i in indices:
        name = f"{i:04d}.png"
        if i % EVERY_BAD == EVERY_BAD - 1:
            (folder / name).write_bytes(b"")
        else:
            pixels = np.random.default_rng(i).integers(0, 256, (96, 128, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "PNG")
            (folder / name).write_bytes(buffer.getvalue())
        lines.append(f"{name},image number {i}")
    (folder / "captions.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _source(tmp_path_factory.mktemp("crash") / "src", range(N_IMAGES))


def _start(src: Path, ds: Path, parallelism: str = "threads") -> subprocess.Popen:
    # Its own session, so the kill takes the worker processes too, as a machine crash would.
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(src), str(ds), parallelism],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _visible_state(ds: Path) -> set[str]:
    """Check what a reader sees: complete parts with the declared schema and unique ids."""
    for sub, schema in (("images", DATASET_SCHEMA), ("quarantine", QUARANTINE_SCHEMA)):
        for part in (ds / sub).glob("part-*.parquet"):
            table = pq.read_table(part)  # a partial file would fail here (no footer)
            assert table.schema.remove_metadata() == schema
            assert table.num_rows == pq.ParquetFile(part).metadata.num_rows > 0
    ids = read_images(ds, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids))
    return set(ids)


@pytest.mark.parametrize(("seed", "parallelism"), [(0, "threads"), (1, "threads"), (2, "processes")])
def test_sigkill_during_the_write_leaves_complete_parts_and_the_rerun_completes(
    tmp_path: Path, source: Path, seed: int, parallelism: str
) -> None:
    ds = tmp_path / "ds"
    child = _start(source, ds, parallelism)
    deadline = time.monotonic() + 120
    while not list((ds / "images").glob("part-*.parquet")):  # the first part is committed
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        assert time.monotonic() < deadline, "the ingest wrote no part in 120 s"
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.0, 0.3))  # the rest takes about 2 s here
    assert child.poll() is None, "the ingest finished before the kill; make the source larger"
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL

    before = _visible_state(ds)
    assert 0 < len(before) < N_IMAGES - N_IMAGES // EVERY_BAD

    report = ingest(source, ds, CFG, workers=2, chunk_rows=8)
    after = _visible_state(ds)
    assert before <= after
    assert (report.unchanged, report.accepted) == (len(before), len(after) - len(before))
    assert len(after) == report.total_rows == N_IMAGES - N_IMAGES // EVERY_BAD
    assert report.rejected == {"not_an_image": N_IMAGES // EVERY_BAD}
    assert read_quarantine(ds).num_rows == N_IMAGES // EVERY_BAD  # each rejected input recorded once
    assert not [p for p in ds.rglob("*.tmp")]  # the crash's temporary file is gone


def test_two_concurrent_ingests_of_overlapping_sources_write_each_id_once(tmp_path: Path) -> None:
    first = _source(tmp_path / "a", range(0, 160))
    second = _source(tmp_path / "b", range(80, 240))  # inputs 80..159 are in both, byte for byte
    ds = tmp_path / "ds"
    children = [_start(first, ds), _start(second, ds)]
    reports = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        reports.append(json.loads(out))
    ids = _visible_state(ds)
    good = lambda r: sum(1 for i in r if i % EVERY_BAD != EVERY_BAD - 1)  # noqa: E731
    assert len(ids) == good(range(240))
    assert sum(r["accepted"] for r in reports) == len(ids)
    assert sum(r["unchanged"] for r in reports) == good(range(80, 160))
    assert read_images(ds).num_rows == len(ids)

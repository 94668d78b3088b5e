"""Consistency under faults: training reads the snapshot its run recorded while new data lands,
LanceDB versions a lineage names stay or fail clearly, and a truncated checkpoint is skipped.
Real Parquet dataset, real LanceDB, real MiniLM embeddings, real truncated files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from faultkit import record

from pogdiff.config import IndexConfig, PoGConfig, TrainConfig
from pogdiff.demo import folder, train_set
from pogdiff.index import image_extractor
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from pogdiff.trainer import train
from storage import dataset, parquet
from storage.config import IngestConfig
from storage.settings import load_settings
from storage.training_set import DataVersion, load_real_set, load_training_set
from tasks.index import build_caption_index, build_image_features
from tasks.results import CaptionIndexReport, ImageFeatureReport

pytestmark = pytest.mark.slow  # servers, processes or whole flows: see pyproject's marker

CFG = IndexConfig(image_feature="pixels", k=3)


def _index(settings, snapshot=None) -> tuple[CaptionIndexReport, ImageFeatureReport]:
    return build_caption_index(settings, CFG, snapshot=snapshot), build_image_features(settings, CFG, snapshot)


def _load(settings, version=None):
    return load_training_set(settings.dataset_uri, settings.lancedb_uri, image_extractor(CFG).name, 16, version)


@pytest.fixture
def two_sources(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    folder.generate_longtail(first, seed=3, size=16, max_count=6, alpha=1.0, min_count=1, holdout=0)
    folder.generate_longtail(second, seed=4, size=16, max_count=6, alpha=1.0, min_count=1, holdout=0)
    return first, second


def _pinned(source, home) -> tuple:
    """Ingest ``source`` into a fresh home, pin its snapshot and index it: (settings, the DataVersion)."""
    settings = load_settings(home=home)
    parquet.ingest(source, settings.dataset_uri, IngestConfig(), workers=1)
    snapshot, rows = dataset.pin_snapshot(settings.dataset_uri)
    captions, features = _index(settings, snapshot)
    return settings, DataVersion(snapshot_id=snapshot, rows=rows, captions_version=captions.version,
                                 features_version=features.version)


def test_training_reads_the_pinned_snapshot_while_new_data_lands(two_sources, tmp_path):
    first, second = two_sources
    settings, version = _pinned(first, tmp_path / "home")
    snapshot, rows = version.snapshot_id, version.rows
    before = _load(settings, version)
    assert len(before.image_ids) == rows

    # the hourly ingest lands between index and train, and refreshes the index for its own snapshot
    added = parquet.ingest(second, settings.dataset_uri, IngestConfig(), workers=1)
    assert added.accepted > 0
    _index(settings)

    pinned = _load(settings, version)
    assert pinned.image_ids == before.image_ids  # exactly the recorded rows
    np.testing.assert_array_equal(pinned.caption_of, before.caption_of)
    np.testing.assert_array_equal(pinned.nb_index, before.nb_index)  # the graph as indexed for the snapshot
    np.testing.assert_array_equal(pinned.density, before.density)
    np.testing.assert_array_equal(pinned.features, before.features)
    assert len(load_real_set(settings.dataset_uri, 16, "individual", snapshot).images) == rows

    now = _load(settings)  # what an unpinned read would have trained on
    assert len(now.image_ids) == rows + added.accepted
    assert set(before.image_ids) < set(now.image_ids)

    # the next retrain pins a new snapshot and picks the new rows up
    later, later_rows = dataset.pin_snapshot(settings.dataset_uri)
    assert later != snapshot and later_rows == rows + added.accepted
    captions, features = _index(settings, later)
    nxt = _load(settings, DataVersion(snapshot_id=later, rows=later_rows, captions_version=captions.version,
                                      features_version=features.version))
    assert nxt.image_ids == now.image_ids
    record("ingest and re-index of new data between index and train (a real second ingest)", "train / evaluate",
           "training and evaluation read the pinned snapshot and the table versions the run recorded: exactly the "
           "recorded rows and graph; the next pinned snapshot picks the new rows up")


def test_a_pruned_table_version_is_one_clear_error(two_sources, tmp_path):
    first, _ = two_sources
    settings, version = _pinned(first, tmp_path / "home")
    gone = version.model_copy(update={"captions_version": version.captions_version + 50})
    with pytest.raises(FileNotFoundError, match=f"'captions' has no version {version.captions_version + 50}"):
        _load(settings, gone)
    with pytest.raises(FileNotFoundError, match="no manifest for snapshot 0123456789abcdef"):
        _load(settings, DataVersion(snapshot_id="0123456789abcdef", rows=1, captions_version=1, features_version=1))
    record("lineage names a pruned LanceDB version or an unknown snapshot", "train",
           "`FileNotFoundError: LanceDB table 'captions' has no version N (pruned, or a re-created table)` / "
           "`no manifest for snapshot ...`; the champion's versions are tagged and never pruned")


def _cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=8, learning_rate=1e-3, checkpoint_every=2, pog=PoGConfig(method="pogdiff"))


def _weights(pipe) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in pipe.unet.parameters()])


def test_resume_falls_back_past_a_truncated_checkpoint_and_clears_crash_leftovers(tiny_spec, tmp_path):
    data = train_set.train_data([12, 6, 3, 2, 2, 1], size=16, k=3)
    once = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    train(once, data, _cfg(6), tmp_path / "once")
    run = tmp_path / "run"
    train(PixelDiffusionPipeline.new(tiny_spec, seed=0), data, _cfg(4), run)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000004"]
    newest = ckpts / "step-00000004" / "unet.safetensors"
    os.truncate(newest, newest.stat().st_size // 2)  # a power loss mid-write of the newest checkpoint
    (ckpts / ".step-00000006.k3j2.tmp").mkdir()  # a save a crash interrupted
    (ckpts / ".step-00000006.k3j2.tmp" / "unet.safetensors").write_bytes(b"partial")
    again = PixelDiffusionPipeline.new(tiny_spec, seed=0)
    result = train(again, data, _cfg(6), run)
    assert result.resumed_from == 2  # step 4 does not verify against its manifest; step 2 does
    torch.testing.assert_close(_weights(again), _weights(once))
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    record("newest checkpoint truncated (power loss mid-write) and an interrupted save's temp folder left", "train",
           "resume verifies each checkpoint's sha256 manifest, skips the truncated one and continues from the previous "
           "(same weights as an uninterrupted run); leftover temp folders removed at start")

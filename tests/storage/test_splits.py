"""Held-out photos: the split column in every source format, the same image never in both splits,
datasets written before the column existed, and (through the real ingest and index, no mocks) no
held-out row in the training set, the caption index or the psi features."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pogdiff.config import IndexConfig
from pogdiff.index import image_extractor
from storage import vectors
from storage.config import IngestConfig
from storage.dataset import (
    DATASET_SCHEMA,
    caption_counts,
    pin_snapshot,
    read_images,
    read_manifest,
    read_quarantine,
    snapshot_id,
)
from storage.parquet import ingest
from storage.settings import load_settings
from storage.training_set import DataVersion, load_holdout_set, load_real_set, load_training_set
from tasks.index import build_caption_index, build_image_features

CFG = IngestConfig()


def png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


# name, split value (None: no value at all), expected: the stored split or the quarantine message's end
ROWS = [
    ("r0", "train", "train"),
    ("r1", "holdout", "holdout"),
    ("r2", "", "train"),
    ("r3", None, "train"),
    ("r4", "hold-out", "split must be 'train' or 'holdout', got 'hold-out'"),
    ("r5", "Train", "split must be 'train' or 'holdout', got 'Train'"),  # exactly the two words, case included
]


def write_folder(src: Path, jsonl: bool) -> Path:
    src.mkdir(parents=True)
    lines = []
    for n, (name, split, _) in enumerate(ROWS):
        (src / f"{name}.png").write_bytes(png(n))
        lines.append({"image": f"{name}.png", "caption": f"caption {name}", "individual": name, "split": split})
    if jsonl:
        lines.append({"image": "r6.png", "caption": "caption r6", "individual": "r6", "split": 1})
        (src / "r6.png").write_bytes(png(6))
        text = "\n".join(json.dumps({k: v for k, v in line.items() if v is not None}) for line in lines)
        (src / "captions.jsonl").write_text(text + "\n", encoding="utf-8")
    else:
        with open(src / "captions.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "caption", "individual", "split"])
            for line in lines:  # no value at all: a short row
                writer.writerow([v for v in line.values() if v is not None])
    return src


def write_parquet(src: Path) -> Path:
    src.mkdir(parents=True)
    table = pa.table({"image": [png(n) for n in range(len(ROWS))], "caption": [f"caption {r[0]}" for r in ROWS],
                      "individual": [r[0] for r in ROWS], "split": pa.array([r[1] for r in ROWS], pa.string())})
    pq.write_table(table, src / "part.parquet")
    return src


def write_shards(src: Path) -> Path:
    src.mkdir(parents=True)

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(src / "shard-0000.tar", "w") as tar:
        for n, (name, split, _) in enumerate(ROWS):
            add(tar, f"{name}.png", png(n))
            meta = {"caption": f"caption {name}", "individual": name}
            if split is not None and n % 2 == 0:  # the split as a key of the .json member ...
                meta["split"] = split
            add(tar, f"{name}.json", json.dumps(meta).encode())
            if split is not None and n % 2 == 1:  # ... or as a member of its own
                add(tar, f"{name}.split", split.encode())
    return src


SOURCES = {"csv": lambda p: write_folder(p, jsonl=False), "jsonl": lambda p: write_folder(p, jsonl=True),
           "parquet": write_parquet, "webdataset": write_shards}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_every_source_format_carries_the_split_and_quarantines_other_values(tmp_path: Path, kind: str) -> None:
    cfg = CFG.model_copy(update={"captions_file": "captions.jsonl"}) if kind == "jsonl" else CFG
    ds = tmp_path / "ds"
    report = ingest(SOURCES[kind](tmp_path / "src"), ds, cfg, workers=1)
    extra = {"r6": "split must be 'train' or 'holdout', got 1"} if kind == "jsonl" else {}  # a JSON number
    assert report.accepted == 4 and report.rejected == {"invalid_split": 2 + len(extra)}
    rows = read_images(ds, columns=["caption", "metadata", "split"]).to_pylist()
    assert {r["caption"]: r["split"] for r in rows} == {f"caption {name}": want for name, _, want in ROWS[:4]}
    # the split is a column of its own, not metadata
    assert sorted((json.loads(r["metadata"]) for r in rows), key=str) == [{"individual": f"r{n}"} for n in range(4)]
    quarantine = read_quarantine(ds).to_pylist()
    assert {q["reason"] for q in quarantine} == {"invalid_split"}
    messages = {want for *_, want in ROWS[4:]} | set(extra.values())
    assert {q["message"].rsplit(": ", 1)[1] for q in quarantine} == messages
    assert read_images(ds, columns=["caption"], split="holdout").column("caption").to_pylist() == ["caption r1"]
    assert caption_counts(ds) == {"caption r0": 1, "caption r2": 1, "caption r3": 1}  # training captions only
    assert read_manifest(ds, report.snapshot_id)["holdout_rows"] == 1


def write_csv(src: Path, rows: list[tuple[str, int, str, str]]) -> Path:
    """rows: (file name, image seed, caption, split)."""
    src.mkdir(parents=True)
    with open(src / "captions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "individual", "split"])
        for name, seed, caption, split in rows:
            (src / name).write_bytes(png(seed))
            writer.writerow([name, caption, caption.split()[0], split])
    return src


def test_the_same_image_is_never_in_both_splits(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    first = write_csv(tmp_path / "first", [
        ("a.png", 1, "Vexo small", "train"),
        ("b.png", 1, "Vexo held", "holdout"),  # a's bytes, another caption, held out
        ("c.png", 2, "Talbrin large", "holdout"),
        ("d.png", 2, "Talbrin large", "train"),  # c's bytes and caption: the same row id, the other split
    ])
    report = ingest(first, ds, CFG, workers=1)
    assert (report.accepted, report.rejected) == (2, {"split_conflict": 2})
    ids = dict(zip(*(read_images(ds, columns=["key", "id"]).column(c).to_pylist() for c in ("key", "id"))))
    messages = {q["key"]: q["message"] for q in read_quarantine(ds).to_pylist()}
    assert messages == {
        "b.png": f"b.png: marked holdout, but the same image is already accepted as train (row id {ids['a.png']}); "
                 "a photo is either trained on or held out, never both",
        "d.png": f"d.png: marked train, but the same image is already accepted as holdout (row id {ids['c.png']}); "
                 "a photo is either trained on or held out, never both",
    }
    # against rows stored by an earlier ingest; the same row in its own split is simply unchanged
    second = write_csv(tmp_path / "second", [
        ("e.png", 1, "Vexo again", "holdout"),
        ("f.png", 2, "Talbrin other", "train"),
        ("g.png", 1, "Vexo small", "train"),
        ("h.png", 1, "Vexo new caption", "train"),  # the same split: the same_image_other_caption policy decides
    ])
    again = ingest(second, ds, CFG, workers=1)
    assert (again.accepted, again.unchanged, again.rejected) == (1, 1, {"split_conflict": 2})
    assert Counter(read_images(ds, columns=["split"]).column("split").to_pylist()) == {"train": 2, "holdout": 1}
    # idempotent: a re-run finds the same conflicts and records nothing twice
    rerun = ingest(first, ds, CFG, workers=1)
    assert (rerun.accepted, rerun.unchanged, rerun.rejected) == (0, 2, {"split_conflict": 2})
    assert read_quarantine(ds).num_rows == 4


def test_a_dataset_written_before_the_split_column_reads_as_all_training(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    report = ingest(write_csv(tmp_path / "src", [("a.png", 1, "Vexo a", ""), ("b.png", 2, "Vexo b", "")]), ds, CFG, workers=1)
    # rewrite its part as the code before splits wrote it: the same columns but split
    part = next((ds / "images").glob("part-*.parquet"))
    old = pq.read_table(part).drop_columns(["split"])
    pq.write_table(old, part)
    assert "split" not in pq.read_schema(part).names

    table = read_images(ds)
    assert table.schema == DATASET_SCHEMA and table.column("split").to_pylist() == ["train", "train"]
    assert read_images(ds, columns=["id"], split="train").num_rows == 2 and read_images(ds, split="holdout").num_rows == 0
    assert caption_counts(ds) == {"Vexo a": 1, "Vexo b": 1}
    # without held-out rows the snapshot id is the one the ids alone gave before splits existed
    ids = sorted(old.column("id").to_pylist())
    assert snapshot_id(ds) == report.snapshot_id == hashlib.sha256("".join(i + "\n" for i in ids).encode()).hexdigest()[:16]

    more = ingest(write_csv(tmp_path / "more", [("c.png", 3, "Vexo c", "holdout")]), ds, CFG, workers=1)
    assert more.accepted == 1 and more.snapshot_id != report.snapshot_id
    assert sorted(read_images(ds, columns=["caption"], split="train").column("caption").to_pylist()) == ["Vexo a", "Vexo b"]
    with pytest.raises(ValueError, match="split must be one of train, holdout or None, got 'test'"):
        read_images(ds, split="test")  # type: ignore[arg-type]


def test_held_out_photos_are_grouped_as_the_training_photos_are(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    ingest(write_csv(tmp_path / "src", [("a.png", 1, "Vexo a", "train"), ("b.png", 2, "Vexo b", "holdout")]), ds, CFG, workers=1)
    held = load_holdout_set(ds, 16, "individual")
    assert (held.names, held.captions, held.grouped_by) == (["Vexo"], ["Vexo b"], "individual")
    # by caption where the training photos name no individual: a held-out caption no training photo has has no bucket
    assert load_holdout_set(ds, 16, "brand") is None
    src = tmp_path / "unnamed"
    src.mkdir()
    (src / "c.png").write_bytes(png(3))
    (src / "captions.csv").write_text("image,caption,split\nc.png,Vexo c,holdout\n")
    ingest(src, ds, CFG, workers=1)
    with pytest.raises(ValueError, match="metadata key 'individual' is missing or empty for 1 of 2 images"):
        load_holdout_set(ds, 16, "individual")
    other = tmp_path / "other"
    ingest(write_csv(tmp_path / "named", [("a.png", 1, "Vexo a", "train")]), other, CFG, workers=1)
    ingest(src, other, CFG, workers=1)
    with pytest.raises(ValueError, match="training images of .* name their individual under metadata key 'individual', "
                                         "its held-out images do not"):
        load_holdout_set(other, 16, "individual")


INDEX = IndexConfig(image_feature="pixels", k=3)
# (file, image seed, caption, individual, split): Vexo and Talbrin have training and held-out photos;
# one held-out caption is also a training caption (its count stays the training count); Quorra has
# held-out photos only
SOURCE = [
    ("v0.png", 10, "Vexo, small, top left, on white", "Vexo", "train"),
    ("v1.png", 11, "Vexo, large, centre, on white", "Vexo", "train"),
    ("v2.png", 12, "Vexo, small, centre, on black", "Vexo", "train"),
    ("v3.png", 13, "Vexo, large, top left, on black", "Vexo", "holdout"),
    ("v4.png", 14, "Vexo, small, top left, on white", "Vexo", "holdout"),
    ("t0.png", 20, "Talbrin, medium, centre, on white", "Talbrin", "train"),
    ("t1.png", 21, "Talbrin, small, bottom right, on black", "Talbrin", "holdout"),
    ("q0.png", 30, "Quorra, large, centre, on white", "Quorra", "holdout"),
]


def test_no_held_out_row_enters_training_the_caption_index_or_the_features(tmp_path: Path, caplog) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "captions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "individual", "split"])
        for name, seed, caption, individual, split in SOURCE:
            (src / name).write_bytes(png(seed))
            writer.writerow([name, caption, individual, split])
    settings = load_settings(home=tmp_path / "home")
    ingest(src, settings.dataset_uri, CFG, workers=1)
    snapshot, rows = pin_snapshot(settings.dataset_uri)
    captions, features = build_caption_index(settings, INDEX, snapshot=snapshot), build_image_features(settings, INDEX, snapshot)
    version = DataVersion(snapshot_id=snapshot, rows=rows, captions_version=captions.version, features_version=features.version)

    table = read_images(settings.dataset_uri, columns=["id", "caption", "split"], snapshot=snapshot).to_pylist()
    held_ids = {r["id"] for r in table if r["split"] == "holdout"}
    train_ids = {r["id"] for r in table if r["split"] == "train"}
    assert len(held_ids) == 4 and len(train_ids) == 4 and rows == 8

    stored = load_training_set(settings.dataset_uri, settings.lancedb_uri, image_extractor(INDEX).name, 16, version)
    assert set(stored.image_ids) == train_ids  # no held-out id
    assert stored.individuals == [next(s[3] for s in SOURCE if s[2] == stored.captions[c]) for c in stored.caption_of]
    unnamed = load_training_set(settings.dataset_uri, settings.lancedb_uri, image_extractor(INDEX).name, 16, version, "brand")
    assert unnamed.individuals is None and unnamed.image_ids == stored.image_ids  # no such metadata key
    # the caption index: training captions only, counted over training images only, neighbours among them
    index = vectors.read_caption_table(settings.lancedb_uri, captions.version).to_pylist()
    train_captions = {s[2] for s in SOURCE if s[4] == "train"}
    assert {r["caption"] for r in index} == train_captions and captions.captions == 4
    assert {r["caption"]: r["count"] for r in index}["Vexo, small, top left, on white"] == 1  # not 2: v4 is held out
    assert {n for r in index for n in r["neighbour_ids"]} <= {r["caption_id"] for r in index}
    assert set(vectors.read_image_features(settings.lancedb_uri, image_extractor(INDEX).name)) == train_ids

    real = load_real_set(settings.dataset_uri, 16, "individual", snapshot)
    assert real.names == ["Talbrin", "Vexo"] and real.counts.tolist() == [1, 3]
    with caplog.at_level(logging.WARNING, logger="storage.training_set"):
        holdout = load_holdout_set(settings.dataset_uri, 16, "individual", snapshot)
    # exactly the held-out photos, grouped under the training names; Quorra's cannot be bucketed
    assert holdout is not None and holdout.names == ["Talbrin", "Vexo"] and holdout.images.shape == (3, 16, 16, 3)
    assert sorted(zip(holdout.captions, (holdout.names[g] for g in holdout.group))) == sorted(
        (s[2], s[3]) for s in SOURCE if s[4] == "holdout" and s[3] != "Quorra")
    assert "1 of 4 held-out images" in caplog.text and "'Quorra'" in caplog.text

    # more held-out photos only: a new snapshot, but the same training captions: nothing to embed, nothing deleted
    more = tmp_path / "more"
    more.mkdir()
    (more / "v5.png").write_bytes(png(15))
    (more / "captions.csv").write_text("image,caption,individual,split\nv5.png,\"Vexo, medium, centre, on black\",Vexo,holdout\n")
    ingest(more, settings.dataset_uri, CFG, workers=1)
    later, later_rows = pin_snapshot(settings.dataset_uri)
    again = build_caption_index(settings, INDEX, snapshot=later)
    assert later != snapshot and later_rows == 9
    assert (again.captions, again.embedded, again.deleted, again.recomputed) == (4, 0, 0, 0)
    assert build_image_features(settings, INDEX, later).computed == 0
    assert len(load_holdout_set(settings.dataset_uri, 16, "individual", later).images) == 4

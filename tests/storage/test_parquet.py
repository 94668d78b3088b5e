"""Parquet ingest of a folder source: schema, round trip, quarantine reasons, idempotence, atomic writes."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage import parquet
from storage.config import IngestConfig
from storage.dataset import (
    DATASET_SCHEMA,
    QUARANTINE_SCHEMA,
    caption_counts,
    read_images,
    read_quarantine,
    snapshot_id,
    snapshot_summary,
)
from storage.items import Reason, SourceError
from storage.parquet import ingest

CFG = IngestConfig()


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (16, 12), colour: int = 0) -> bytes:
    """A small deterministic image; ``colour`` makes distinct contents."""
    im = Image.new("RGB", size, ((colour * 37) % 256, (colour * 91) % 256, (colour * 53) % 256))
    im.putpixel((0, 0), (colour % 256, 1, 2))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def write_csv(folder: Path, rows: list[dict[str, str]], name: str = "captions.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fields = list(rows[0]) if rows else ["image", "caption"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_source(tmp_path: Path, n: int = 3, name: str = "src") -> Path:
    """``n`` distinct valid PNG/JPEG images with captions and one extra metadata column."""
    src = tmp_path / name
    (src / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        fmt, ext = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
        (src / "img" / f"{i}.{ext}").write_bytes(image_bytes(fmt, colour=i + 1))
        rows.append({"image": f"img/{i}.{ext}", "caption": f"  caption {i}  ", "shard": f"s{i}"})
    write_csv(src, rows)
    return src


def part_files(dataset: Path) -> list[str]:
    return sorted(str(p.relative_to(dataset)) for p in dataset.rglob("*.parquet"))


def quarantine_reasons(dataset: Path) -> dict[str, str]:
    table = read_quarantine(dataset)
    return dict(zip(table.column("key").to_pylist(), table.column("reason").to_pylist()))


# ------------------------------------------------------------------------------------------------


def test_happy_path_rows_columns_and_image_round_trip(tmp_path: Path) -> None:
    src, ds = make_source(tmp_path, n=3), tmp_path / "ds"
    report = ingest(src, ds, CFG, batch_id="b1", workers=2)

    assert (report.accepted, report.unchanged, report.rejected, report.total_rows) == (3, 0, {}, 3)
    assert report.batch_id == "b1"
    table = read_images(ds)
    assert table.schema == DATASET_SCHEMA
    assert table.num_rows == 3
    assert table.column("id").to_pylist() == sorted(table.column("id").to_pylist())
    for row in table.to_pylist():
        original = (src / row["key"]).read_bytes()
        expected_id = hashlib.sha256(original + b"\0" + row["caption"].encode()).hexdigest()[:32]
        assert row["id"] == expected_id
        assert row["image_sha256"] == hashlib.sha256(original).hexdigest()
        assert row["caption"] == row["caption"].strip() and row["caption"].startswith("caption ")
        assert (row["width"], row["height"]) == (16, 12)
        assert row["format"] == ("PNG" if row["key"].endswith(".png") else "JPEG")
        assert row["source"] == str(src)
        assert row["batch_id"] == "b1"
        assert row["ingested_at"].tzinfo is not None
        # Stored: the central 12x12 square (smaller than the resolution, so not enlarged), as PNG.
        with Image.open(io.BytesIO(row["image"])) as im, Image.open(io.BytesIO(original)) as orig:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (12, 12))
            assert np.array_equal(np.asarray(im), np.asarray(orig.convert("RGB").crop((2, 0, 14, 12))))
    assert part_files(ds) == ["images/part-b1-00000.parquet"]
    assert report.snapshot_id == snapshot_id(ds) != "empty"
    assert snapshot_summary(ds) == (report.snapshot_id, report.total_rows)
    assert read_quarantine(ds).num_rows == 0
    assert read_quarantine(ds).schema == QUARANTINE_SCHEMA


def test_metadata_json_keeps_extra_columns(tmp_path: Path) -> None:
    src, ds = make_source(tmp_path, n=2), tmp_path / "ds"
    ingest(src, ds, CFG)
    table = read_images(ds, columns=["key", "metadata"])
    assert table.column_names == ["key", "metadata"]
    meta = {k: json.loads(m) for k, m in zip(table.column("key").to_pylist(), table.column("metadata").to_pylist())}
    assert meta == {"img/0.png": {"shard": "s0"}, "img/1.jpg": {"shard": "s1"}}


def test_rerun_is_idempotent(tmp_path: Path) -> None:
    src, ds = make_source(tmp_path, n=4), tmp_path / "ds"
    (src / "junk.png").write_bytes(b"not an image")
    with open(src / "captions.csv", "a", encoding="utf-8") as handle:
        handle.write("junk.png,junk,x\nimg/0.png,caption 0,dup\n")

    first = ingest(src, ds, CFG, batch_id="one")
    files, quarantine = part_files(ds), read_quarantine(ds)
    second = ingest(src, ds, CFG, batch_id="two")

    assert (first.accepted, first.unchanged) == (4, 0)
    assert (second.accepted, second.unchanged) == (0, 4)
    assert first.rejected == second.rejected == {"duplicate": 1, "not_an_image": 1}
    assert second.snapshot_id == first.snapshot_id == snapshot_id(ds)
    assert second.total_rows == read_images(ds).num_rows == 4
    assert part_files(ds) == files
    assert read_quarantine(ds).equals(quarantine)
    assert quarantine.num_rows == 2


def test_new_image_added_later_is_the_only_one_accepted(tmp_path: Path) -> None:
    src, ds = make_source(tmp_path, n=2), tmp_path / "ds"
    before = ingest(src, ds, CFG, batch_id="b1")
    (src / "img" / "new.png").write_bytes(image_bytes(colour=99))
    with open(src / "captions.csv", "a", encoding="utf-8") as handle:
        handle.write("img/new.png,a new caption,s9\n")

    after = ingest(src, ds, CFG, batch_id="b2")
    assert (after.accepted, after.unchanged, after.total_rows) == (1, 2, 3)
    assert after.snapshot_id != before.snapshot_id
    new = read_images(ds).filter(pc.equal(read_images(ds).column("batch_id"), "b2"))
    assert new.column("key").to_pylist() == ["img/new.png"]
    assert part_files(ds) == ["images/part-b1-00000.parquet", "images/part-b2-00000.parquet"]


def test_every_reason_code_from_crafted_inputs(tmp_path: Path) -> None:
    src, ds = tmp_path / "src", tmp_path / "ds"
    src.mkdir()
    outside = tmp_path / "outside.png"
    outside.write_bytes(image_bytes(colour=7))
    os.symlink(outside, src / "link.png")
    os.symlink(src / "ok.png", src / "inner_link.png")  # a symlink inside the source is fine
    (src / "ok.png").write_bytes(image_bytes(colour=1))
    (src / "copy.png").write_bytes(image_bytes(colour=1))  # same bytes as ok.png
    (src / "text.png").write_text("hello, not an image")
    (src / "cut.png").write_bytes(image_bytes(size=(64, 64), colour=3)[:80])
    (src / "pic.gif").write_bytes(image_bytes("GIF", colour=4))
    (src / "tiny.png").write_bytes(image_bytes(size=(4, 40), colour=5))
    (src / "huge.png").write_bytes(image_bytes(size=(200, 100), colour=6))
    (src / "a.png").write_bytes(image_bytes(colour=8))
    (src / "b.png").write_bytes(image_bytes(colour=9))
    (src / "c.png").write_bytes(image_bytes(colour=10))
    (src / "bad.png").write_bytes(image_bytes(colour=11))
    lines = [
        b"image,caption,note",
        b"ok.png,a red square,n",
        b"inner_link.png,a red square via a link,n",
        b"ok.png,a red square,repeated row",  # duplicate (same key)
        b"copy.png,a red square,other file same bytes",  # duplicate (other key, same id)
        b"missing.png,gone,n",
        b"../outside.png,escape,n",
        b"/abs/path.png,absolute,n",
        b"link.png,symlink out,n",
        b"text.png,text,n",
        b"cut.png,cut,n",
        b"pic.gif,gif,n",
        b"tiny.png,tiny,n",
        b"huge.png,huge,n",
        b"a.png,   ,n",
        b"b.png,caf\xff bad bytes,n",
        b"c.png," + b"x" * 50 + b",n",
        b"bad.png,too,many,fields",
    ]
    (src / "captions.csv").write_bytes(b"\n".join(lines) + b"\n")
    cfg = IngestConfig(allowed_formats=("PNG", "JPEG"), min_side=8, max_pixels=10_000, max_caption_chars=40)

    report = ingest(src, ds, cfg, workers=3)

    assert report.accepted == 2  # ok.png and inner_link.png (different caption, so a different id)
    reasons = quarantine_reasons(ds)
    assert reasons == {
        "ok.png": "duplicate",
        "copy.png": "duplicate",
        "missing.png": "missing_file",
        "../outside.png": "path_outside_source",
        "/abs/path.png": "path_outside_source",
        "link.png": "path_outside_source",
        "text.png": "not_an_image",
        "cut.png": "truncated",
        "pic.gif": "format_not_allowed",
        "tiny.png": "too_small",
        "huge.png": "too_many_pixels",
        "a.png": "empty_caption",
        "b.png": "invalid_utf8",
        "c.png": "caption_too_long",
        "captions.csv:18": "malformed_row",
    }
    assert sum(report.rejected.values()) == len(reasons)
    assert set(reasons.values()) <= {r.value for r in Reason}
    messages = read_quarantine(ds).column("message").to_pylist()
    assert all(m.strip() and "\n" not in m for m in messages)
    huge = read_quarantine(ds).filter(pc.equal(read_quarantine(ds).column("key"), "huge.png"))
    assert "200x100" in huge.column("message")[0].as_py()
    bad = read_quarantine(ds).filter(pc.equal(read_quarantine(ds).column("key"), "b.png"))
    assert "caf\\xff bad bytes" in bad.column("message")[0].as_py()  # the bad byte is shown, escaped


def test_too_many_pixels_is_checked_before_decoding(tmp_path: Path) -> None:
    # A file whose header promises many pixels but whose data is cut short: the header check wins.
    src, ds = tmp_path / "src", tmp_path / "ds"
    src.mkdir()
    (src / "bomb.png").write_bytes(image_bytes(size=(400, 400), colour=2)[:100])
    write_csv(src, [{"image": "bomb.png", "caption": "bomb"}])
    ingest(src, ds, IngestConfig(max_pixels=1000))
    assert quarantine_reasons(ds) == {"bomb.png": "too_many_pixels"}


def test_pil_bomb_limit_does_not_pre_empt_max_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL would refuse a 40x40 image outright
    src, ds = tmp_path / "src", tmp_path / "ds"
    src.mkdir()
    (src / "big.png").write_bytes(image_bytes(size=(40, 40)))
    write_csv(src, [{"image": "big.png", "caption": "forty"}])
    report = ingest(src, ds, IngestConfig(max_pixels=10_000))
    assert report.accepted == 1
    assert Image.MAX_IMAGE_PIXELS == 100  # restored after the ingest


def test_caption_overflow_truncate(tmp_path: Path) -> None:
    src, ds = tmp_path / "src", tmp_path / "ds"
    src.mkdir()
    (src / "a.png").write_bytes(image_bytes())
    write_csv(src, [{"image": "a.png", "caption": "abcdefghij" * 3}])
    report = ingest(src, ds, IngestConfig(max_caption_chars=12, caption_overflow="truncate"))
    assert report.accepted == 1
    assert read_images(ds).column("caption").to_pylist() == ["abcdefghijab"]


def test_same_image_other_caption_policy(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(image_bytes(colour=4))
    (src / "b.png").write_bytes(image_bytes(colour=4))
    write_csv(src, [{"image": "a.png", "caption": "first"}, {"image": "b.png", "caption": "second"}])

    keep = ingest(src, tmp_path / "keep", IngestConfig(same_image_other_caption="keep"))
    assert keep.accepted == 2 and keep.rejected == {}

    cfg = IngestConfig(same_image_other_caption="reject")
    reject = ingest(src, tmp_path / "reject", cfg)
    assert reject.accepted == 1
    assert reject.rejected == {"same_image_other_caption": 1}
    assert quarantine_reasons(tmp_path / "reject") == {"b.png": "same_image_other_caption"}

    # Against images already in the dataset from an earlier ingest of another source, too.
    other = tmp_path / "other"
    other.mkdir()
    (other / "c.png").write_bytes(image_bytes(colour=4))
    write_csv(other, [{"image": "c.png", "caption": "third"}])
    again = ingest(other, tmp_path / "reject", cfg)
    assert (again.accepted, again.rejected) == (0, {"same_image_other_caption": 1})
    rerun = ingest(src, tmp_path / "reject", cfg)
    assert (rerun.accepted, rerun.unchanged) == (0, 1)
    assert read_quarantine(tmp_path / "reject").num_rows == 2


def test_jsonl_source(tmp_path: Path) -> None:
    src, ds = tmp_path / "src", tmp_path / "ds"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(image_bytes(colour=20 + i))
    lines = [
        json.dumps({"file": "0.png", "text": " zero ", "tags": ["a", "b"], "score": 0.5}).encode(),
        b"",
        b'{"file": "1.png", "text": "caf\xe9"}',  # latin-1 byte: invalid UTF-8
        b"{not json",
        json.dumps({"file": "2.png", "text": "two"}).encode(),
        json.dumps(["a", "list"]).encode(),
    ]
    (src / "caps.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cfg = IngestConfig(captions_file="caps.jsonl", image_column="file", caption_column="text")

    report = ingest(src, ds, cfg)

    assert report.accepted == 2
    table = read_images(ds)
    rows = {r["key"]: r for r in table.to_pylist()}
    assert set(rows) == {"0.png", "2.png"}
    assert rows["0.png"]["caption"] == "zero"
    assert json.loads(rows["0.png"]["metadata"]) == {"tags": ["a", "b"], "score": 0.5}
    assert json.loads(rows["2.png"]["metadata"]) == {}
    assert quarantine_reasons(ds) == {
        "1.png": "invalid_utf8",
        "caps.jsonl:4": "malformed_row",
        "caps.jsonl:6": "malformed_row",
    }


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("no_folder", "source folder not found: {src}"),
        ("no_captions", "captions file not found: {src}/captions.csv"),
        ("no_column", "cannot read captions file {src}/captions.csv: missing column 'caption'"),
        ("no_jsonl_column", "cannot read captions file {src}/captions.jsonl: missing column 'caption'"),
        ("bad_extension", "cannot read captions file {src}/captions.txt: unsupported extension"),
        ("empty_csv", "cannot read captions file {src}/captions.csv: no header row"),
    ],
)
def test_source_errors_name_the_file(tmp_path: Path, setup: str, expected: str) -> None:
    src, ds = tmp_path / "data" / "src", tmp_path / "ds"
    cfg = CFG
    if setup != "no_folder":
        src.mkdir(parents=True)
    if setup == "no_column":
        (src / "captions.csv").write_text("image,text\na.png,hello\n")
    if setup == "no_jsonl_column":
        (src / "captions.jsonl").write_text('{"image": "a.png", "text": "hello"}\n')
        cfg = IngestConfig(captions_file="captions.jsonl")
    if setup == "bad_extension":
        (src / "captions.txt").write_text("a.png hello\n")
        cfg = IngestConfig(captions_file="captions.txt")
    if setup == "empty_csv":
        (src / "captions.csv").write_bytes(b"")

    with pytest.raises(SourceError) as err:
        ingest(src, ds, cfg)
    message = str(err.value)
    assert message.startswith(expected.format(src=src))
    assert "\n" not in message
    assert not ds.exists()  # a bad source never creates or changes the dataset


def test_chunks_write_one_part_each_and_workers_do_not_change_the_result(tmp_path: Path) -> None:
    src = make_source(tmp_path, n=7)
    with open(src / "captions.csv", "a", encoding="utf-8") as handle:
        handle.write("nope.png,missing,x\n")
    one = ingest(src, tmp_path / "one", CFG, batch_id="b", workers=1, chunk_rows=3)
    many = ingest(src, tmp_path / "many", CFG, batch_id="b", workers=4, chunk_rows=512)
    assert one.snapshot_id == many.snapshot_id
    assert part_files(tmp_path / "one") == [
        "images/part-b-00000.parquet",
        "images/part-b-00001.parquet",
        "images/part-b-00002.parquet",
        "quarantine/part-b-00000.parquet",
    ]
    columns = [c for c in DATASET_SCHEMA.names if c != "ingested_at"]
    assert read_images(tmp_path / "one", columns).equals(read_images(tmp_path / "many", columns))


def test_reused_batch_id_never_overwrites_a_part(tmp_path: Path) -> None:
    src, ds = make_source(tmp_path, n=1), tmp_path / "ds"
    ingest(src, ds, CFG, batch_id="same")
    other = make_source(tmp_path, n=2, name="src2")
    (other / "img" / "0.png").write_bytes(image_bytes(colour=50))
    report = ingest(other, ds, CFG, batch_id="same")
    assert report.accepted == 2 and report.total_rows == 3
    assert part_files(ds) == ["images/part-same-00000.parquet", "images/part-same-00001.parquet"]


def test_no_temp_files_and_a_failed_write_leaves_nothing_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, ds = make_source(tmp_path, n=5), tmp_path / "ds"
    real_write = pq.write_table
    calls = {"n": 0}

    def crash_on_second_part(table: pa.Table, where: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            real_write(table.slice(0, 1), where, **kwargs)  # a partial file on disk, then the crash
            raise OSError("disk full")
        real_write(table, where, **kwargs)

    monkeypatch.setattr(parquet.pq, "write_table", crash_on_second_part)
    with pytest.raises(OSError, match="disk full"):
        ingest(src, ds, CFG, batch_id="crash", chunk_rows=2)
    monkeypatch.setattr(parquet.pq, "write_table", real_write)

    assert sorted(p.name for p in ds.rglob("*") if p.is_file() and p.name != ".lock") == [
        "part-crash-00000.parquet"
    ]
    assert read_images(ds).num_rows == 2

    report = ingest(src, ds, CFG, batch_id="resume", chunk_rows=2)  # finishing the job
    assert (report.accepted, report.unchanged, report.total_rows) == (3, 2, 5)
    leftovers = sorted(p.relative_to(ds).as_posix() for p in ds.rglob("*") if p.is_file() and p.suffix != ".parquet")
    assert leftovers == [".lock", f"snapshots/{report.snapshot_id}.json"]


def test_stale_temp_file_is_ignored_by_readers_and_removed_by_ingest(tmp_path: Path) -> None:
    src, ds = make_source(tmp_path, n=2), tmp_path / "ds"
    ingest(src, ds, CFG)
    stale = ds / "images" / ".part-x-00000.parquet.deadbeef.tmp"
    stale.write_bytes(b"half a parquet file")
    assert read_images(ds).num_rows == 2
    ingest(src, ds, CFG)
    assert not stale.exists()


def test_caption_counts_and_snapshot_of_an_empty_dataset(tmp_path: Path) -> None:
    src, ds = tmp_path / "src", tmp_path / "ds"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(image_bytes(colour=30 + i))
    write_csv(
        src,
        [
            {"image": "0.png", "caption": "a cat"},
            {"image": "1.png", "caption": " a cat "},
            {"image": "2.png", "caption": "a dog"},
        ],
    )
    ingest(src, ds, CFG)
    assert caption_counts(ds) == {"a cat": 2, "a dog": 1}

    empty_src, empty_ds = tmp_path / "empty", tmp_path / "empty_ds"
    empty_src.mkdir()
    write_csv(empty_src, [{"image": "gone.png", "caption": "nothing here"}])
    report = ingest(empty_src, empty_ds, CFG)
    assert (report.accepted, report.snapshot_id, report.total_rows) == (0, "empty", 0)
    assert snapshot_id(empty_ds) == "empty" and snapshot_summary(empty_ds) == ("empty", 0)
    assert caption_counts(empty_ds) == {}
    assert read_images(empty_ds).schema == DATASET_SCHEMA


def test_invalid_arguments_and_missing_dataset(tmp_path: Path) -> None:
    src = make_source(tmp_path, n=1)
    with pytest.raises(ValueError, match="batch_id"):
        ingest(src, tmp_path / "ds", CFG, batch_id="../escape")
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        read_images(tmp_path / "nowhere")
    ingest(src, tmp_path / "ds", CFG)
    with pytest.raises(ValueError, match="unknown column"):
        read_images(tmp_path / "ds", columns=["nope"])

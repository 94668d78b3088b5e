"""The three source formats: one fixture of good inputs and every bad kind, in folder, Parquet and
WebDataset form, must give the same accepted rows and the expected quarantine reasons."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage.config import IngestConfig
from storage.dataset import read_images, read_manifest, read_quarantine
from storage.items import SourceError
from storage.parquet import ingest
from storage.sources import check_source, detect_kind
from storage.validate import normalise

CFG = IngestConfig(allowed_formats=("PNG", "JPEG", "WEBP"), min_side=8, max_caption_chars=40)


def encoded(fmt: str = "PNG", size: tuple[int, int] = (24, 16), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    im.save(buffer, fmt)
    return buffer.getvalue()


def corrupt_png() -> bytes:
    data = bytearray(encoded(size=(64, 64), seed=40))
    middle = len(data) // 2  # inside the IDAT chunk: the header reads, the pixel data does not
    data[middle : middle + 20] = b"\xff" * 20
    return bytes(data)


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose IHDR (with a valid CRC) claims ``width`` x ``height``."""
    data = bytearray(encoded(seed=41))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


@dataclass(frozen=True)
class Case:
    name: str
    image: bytes | None  # None: the image is absent
    caption: bytes
    reason: str | None  # expected quarantine reason; None: accepted (or, for "dup", a duplicate)


GOOD = [
    Case("good_png", encoded("PNG", seed=1), b"a red circle", None),
    Case("good_jpeg", encoded("JPEG", (40, 30), seed=2), b"a blue square", None),
    Case("good_webp", encoded("WEBP", (30, 40), seed=3), b"a green star", None),
]
BAD = [
    Case("dup", encoded("PNG", seed=1), b"a red circle", "duplicate"),
    Case("corrupt", corrupt_png(), b"corrupt png", "truncated"),
    Case("cut", _half(encoded("JPEG", (64, 64), seed=4)), b"truncated jpeg", "truncated"),
    Case("zero", b"", b"zero bytes", "not_an_image"),
    Case("text", b"hello, I am text", b"text named png", "not_an_image"),
    Case("bomb", png_claiming(30000, 30000), b"bomb", "too_many_pixels"),
    Case("gif", encoded("GIF", seed=5), b"a gif", "format_not_allowed"),
    Case("tiny", encoded("PNG", (4, 40), seed=6), b"tiny", "too_small"),
    Case("empty", encoded("PNG", seed=7), b"   ", "empty_caption"),
    Case("latin1", encoded("PNG", seed=8), b"caf\xe9 au lait", "invalid_utf8"),
    Case("long", encoded("PNG", seed=9), b"x" * 60, "caption_too_long"),
    Case("missing", None, b"gone", "missing_file"),
]
EXPECTED = Counter(c.reason for c in BAD)
EXPECTED["path_outside_source"] = 0  # the format-specific escapes add to this


def _ext(case: Case) -> str:
    return {"good_jpeg": "jpg", "cut": "jpg", "good_webp": "webp", "gif": "gif"}.get(case.name, "png")


def folder_source(tmp: Path) -> tuple[Path, Counter]:
    src = tmp / "folder"
    src.mkdir(parents=True)
    lines = [b"image,caption"]
    for case in GOOD + BAD:
        name = f"{case.name}.{_ext(case)}"
        if case.image is not None:
            (src / name).write_bytes(case.image)
        lines.append(name.encode() + b',"' + case.caption + b'"')
    (tmp / "outside.png").write_bytes(encoded(seed=50))
    os.symlink(tmp / "outside.png", src / "link.png")
    lines += [b"link.png,symlink out of the root", b"../outside.png,dot dot", b"/etc/hosts,absolute"]
    (src / "captions.csv").write_bytes(b"\n".join(lines) + b"\n")
    return src, EXPECTED + Counter({"path_outside_source": 3})


def parquet_source(tmp: Path) -> tuple[Path, Counter]:
    """The Hugging Face datasets export shape: image struct<bytes, path>, here with a binary caption
    column (so a non-UTF-8 caption can exist), an extra column, and path-only rows."""
    src = tmp / "pq"
    src.mkdir(parents=True)
    (tmp / "outside.png").write_bytes(encoded(seed=50))
    os.symlink(tmp / "outside.png", src / "link.png")
    images, captions = [], []
    for case in GOOD + BAD:
        if case.image is None:
            images.append({"bytes": None, "path": "gone.png"})
        else:
            images.append({"bytes": case.image, "path": f"{case.name}.{_ext(case)}"})
        captions.append(case.caption)
    for path in ("link.png", "../outside.png", "/etc/hosts"):
        images.append({"bytes": None, "path": path})
        captions.append(b"escape")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(images, image_type),
            "caption": pa.array(captions, pa.binary()),
            "row": pa.array(range(len(images)), pa.int64()),
        }
    )
    half = len(images) // 2  # two files in a folder, the second in a sub-folder
    pq.write_table(table.slice(0, half), src / "train-00000.parquet")
    (src / "more").mkdir()
    pq.write_table(table.slice(half), src / "more" / "train-00001.parquet")
    return src, EXPECTED + Counter({"path_outside_source": 3})


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def tar_source(tmp: Path) -> tuple[Path, Counter]:
    src = tmp / "shards"
    src.mkdir(parents=True)
    cases = GOOD + BAD
    for shard, part in enumerate((cases[:7], cases[7:])):
        with tarfile.open(src / f"shard-{shard:04d}.tar", "w") as tar:
            for case in part:
                if case.image is not None:
                    _add(tar, f"{case.name}.{_ext(case)}", case.image)
                if case.name == "good_webp":  # caption from a .json member, with metadata
                    _add(tar, f"{case.name}.json", json.dumps({"caption": case.caption.decode(), "w": 30}).encode())
                else:
                    _add(tar, f"{case.name}.txt", case.caption)
            if shard == 1:
                link = tarfile.TarInfo("link.png")
                link.type, link.linkname = tarfile.SYMTYPE, "../../outside.png"
                tar.addfile(link)
                _add(tar, "link.txt", b"symlink member")
                _add(tar, "../x.png", encoded(seed=60))
                _add(tar, "../x.txt", b"dot dot member")
                _add(tar, "/abs/y.png", encoded(seed=61))
                _add(tar, "/abs/y.txt", b"absolute member")
    return src, EXPECTED + Counter({"path_outside_source": 3})


SOURCES = {"folder": folder_source, "parquet": parquet_source, "webdataset": tar_source}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_every_bad_kind_is_quarantined_with_its_reason(tmp_path: Path, kind: str) -> None:
    src, expected = SOURCES[kind](tmp_path)
    ds = tmp_path / "ds"
    assert detect_kind(src, CFG) == kind
    report = ingest(src, ds, CFG, workers=2, chunk_rows=5)

    assert report.source_kind == kind
    assert report.accepted == 3 and report.unchanged == 0
    assert report.rejected == {reason: n for reason, n in sorted(expected.items())}
    quarantine = read_quarantine(ds)
    assert Counter(quarantine.column("reason").to_pylist()) == expected
    assert all(m.strip() and "\n" not in m for m in quarantine.column("message").to_pylist())
    table = read_images(ds)
    assert sorted(table.column("caption").to_pylist()) == ["a blue square", "a green star", "a red circle"]
    assert sorted(table.column("format").to_pylist()) == ["JPEG", "PNG", "WEBP"]
    sizes = {c: (w, h) for c, w, h in zip(*(table.column(n).to_pylist() for n in ("caption", "width", "height")))}
    assert sizes == {"a red circle": (24, 16), "a blue square": (40, 30), "a green star": (30, 40)}

    again = ingest(src, ds, CFG, workers=2, chunk_rows=5)
    assert (again.accepted, again.unchanged, again.snapshot_id) == (0, 3, report.snapshot_id)
    assert read_quarantine(ds).num_rows == quarantine.num_rows


def test_the_same_inputs_give_the_same_rows_in_every_format(tmp_path: Path) -> None:
    ids = {}
    for kind, build in SOURCES.items():
        src, _ = build(tmp_path / kind)
        ingest(src, tmp_path / kind / "ds", CFG, workers=1)
        ids[kind] = read_images(tmp_path / kind / "ds", columns=["id", "image"]).to_pylist()
    assert ids["folder"] == ids["parquet"] == ids["webdataset"]


def test_parquet_plain_binary_column_string_captions_and_metadata(tmp_path: Path) -> None:
    src = tmp_path / "one.parquet"
    table = pa.table(
        {
            "jpg": pa.array([encoded("JPEG", seed=1), encoded("PNG", seed=2)], pa.large_binary()),
            "text": ["first", "second"],
            "score": [0.5, 0.25],
            "thumb": pa.array([b"x", b"y"], pa.binary()),  # binary extras are not metadata
        }
    )
    pq.write_table(table, src)
    cfg = IngestConfig(image_column="jpg", caption_column="text")
    report = ingest(src, tmp_path / "ds", cfg, workers=1)
    assert (report.accepted, report.source_kind) == (2, "parquet")
    rows = read_images(tmp_path / "ds", columns=["key", "metadata"]).to_pylist()
    assert sorted((r["key"], json.loads(r["metadata"])) for r in rows) == [
        ("one.parquet:0", {"score": 0.5}),
        ("one.parquet:1", {"score": 0.25}),
    ]


def test_webdataset_json_caption_and_extra_members_are_metadata(tmp_path: Path) -> None:
    shard = tmp_path / "one.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "d/k1.jpg", encoded("JPEG", seed=1))
        _add(tar, "d/k1.json", json.dumps({"caption": "json caption", "id": 7}).encode())
        _add(tar, "d/k1.cls", b"3")
        _add(tar, "d/k2.png", encoded("PNG", seed=2))
        _add(tar, "d/k2.txt", b"text caption")
        _add(tar, "d/k3.jpg", encoded("JPEG", seed=3))
        _add(tar, "d/k3.png", encoded("PNG", seed=4))
        _add(tar, "d/k3.txt", b"two images")
        _add(tar, "d/k4.png", encoded("PNG", seed=5))
    report = ingest(shard, tmp_path / "ds", CFG, workers=1)
    rows = {r["key"]: r for r in read_images(tmp_path / "ds", columns=["key", "caption", "metadata"]).to_pylist()}
    assert {k: (r["caption"], json.loads(r["metadata"])) for k, r in rows.items()} == {
        "one.tar:d/k1": ("json caption", {"id": 7, "cls": "3"}),
        "one.tar:d/k2": ("text caption", {}),
    }
    assert report.rejected == {"malformed_row": 2}
    reasons = dict(zip(*(read_quarantine(tmp_path / "ds").column(c).to_pylist() for c in ("key", "message"))))
    assert "more than one image member" in reasons["one.tar:d/k3"]
    assert "no .txt member" in reasons["one.tar:d/k4"]


def test_a_truncated_shard_keeps_what_was_read_and_quarantines_the_rest(tmp_path: Path) -> None:
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tar:
        for i in range(4):
            _add(tar, f"k{i}.png", encoded("PNG", (64, 64), seed=i))
            _add(tar, f"k{i}.txt", f"caption {i}".encode())
    src = tmp_path / "src"
    src.mkdir()
    data = whole.read_bytes()
    (src / "cut.tar").write_bytes(data[: len(data) * 2 // 3])
    report = ingest(src, tmp_path / "ds", CFG, workers=1)
    assert report.accepted + sum(report.rejected.values()) == 3
    assert report.rejected == {"malformed_row": 1}
    assert "shard unreadable" in read_quarantine(tmp_path / "ds").column("message")[0].as_py()


@pytest.mark.parametrize(
    ("setup", "kind", "expected"),
    [
        ("empty_folder", "auto", "captions file not found: {src}/captions.csv (and no *.parquet or *.tar files in {src})"),
        ("text_file", "auto", "source file {src}/notes.txt is neither .parquet nor .tar"),
        ("parquet_no_caption", "auto", "cannot read Parquet file {src}/a.parquet: missing column 'caption'"),
        ("parquet_bad_type", "auto", "cannot read Parquet file {src}/a.parquet: column 'image' has type int64"),
        ("not_parquet", "parquet", "cannot read Parquet file {src}/a.parquet:"),
        ("empty_folder", "webdataset", "no .tar shards in {src}"),
        ("empty_folder", "parquet", "no .parquet files in {src}"),
    ],
)
def test_unreadable_sources_are_one_line_naming_the_file(tmp_path: Path, setup: str, kind: str, expected: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    target = src
    if setup == "text_file":
        target = src / "notes.txt"
        target.write_text("hello")
    if setup == "parquet_no_caption":
        pq.write_table(pa.table({"image": [b"x"], "text": ["t"]}), src / "a.parquet")
    if setup == "parquet_bad_type":
        pq.write_table(pa.table({"image": [1], "caption": ["t"]}), src / "a.parquet")
    if setup == "not_parquet":
        (src / "a.parquet").write_bytes(b"not parquet at all")
    cfg = IngestConfig(source_kind=kind)
    with pytest.raises(SourceError) as err:
        check_source(target, cfg)
    assert str(err.value).startswith(expected.format(src=src)) and "\n" not in str(err.value)
    with pytest.raises(SourceError):
        ingest(target, tmp_path / "ds", cfg)
    assert not (tmp_path / "ds").exists()


def test_a_captions_file_wins_detection_and_the_override_forces_a_kind(tmp_path: Path) -> None:
    src, _ = folder_source(tmp_path)
    pq.write_table(pa.table({"image": [encoded(seed=70)], "caption": ["from parquet"]}), src / "extra.parquet")
    assert detect_kind(src, CFG) == "folder"
    report = ingest(src, tmp_path / "ds", CFG.model_copy(update={"source_kind": "parquet"}), workers=1)
    assert (report.source_kind, report.accepted) == ("parquet", 1)


@pytest.mark.parametrize("parallelism", ["processes", "threads"])
def test_pool_kinds_give_the_same_dataset(tmp_path: Path, parallelism: str) -> None:
    src, _ = tar_source(tmp_path)
    cfg = CFG.model_copy(update={"parallelism": parallelism})
    report = ingest(src, tmp_path / "ds", cfg, workers=2, chunk_rows=4)
    serial = ingest(src, tmp_path / "serial", cfg, workers=1)
    assert report.model_dump(exclude={"batch_id"}) == serial.model_dump(exclude={"batch_id"})
    columns = ["id", "image", "key", "caption"]
    assert read_images(tmp_path / "ds", columns).equals(read_images(tmp_path / "serial", columns))


def test_snapshot_manifest_lists_the_parts(tmp_path: Path) -> None:
    src, _ = folder_source(tmp_path)
    ds = tmp_path / "ds"
    report = ingest(src, ds, CFG, workers=1, chunk_rows=2)
    manifest = read_manifest(ds, report.snapshot_id)
    assert report.manifest == f"snapshots/{report.snapshot_id}.json"
    assert manifest["rows"] == 3 == sum(f["rows"] for f in manifest["files"])
    assert all((ds / f["path"]).stat().st_size == f["bytes"] for f in manifest["files"])
    with pytest.raises(FileNotFoundError, match="no manifest"):
        read_manifest(ds, "0" * 16)


def _decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def test_normalise_crop_pad_upscale_and_encodings() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high
    im = Image.fromarray(pixels)
    crop = _decoded(normalise(im, IngestConfig(resolution=64)))
    assert np.array_equal(crop, pixels[:, 10:30])  # central square, not enlarged
    pad = _decoded(normalise(im, IngestConfig(resolution=64, aspect="pad")))
    assert pad.shape == (40, 40, 3) and np.array_equal(pad[10:30], pixels) and not pad[:10].any()
    assert _decoded(normalise(im, IngestConfig(resolution=64, upscale=True))).shape == (64, 64, 3)
    assert _decoded(normalise(im, IngestConfig(resolution=10))).shape == (10, 10, 3)
    webp = normalise(im, IngestConfig(resolution=16, image_encoding="webp"))
    with Image.open(io.BytesIO(webp)) as out:
        assert (out.format, out.size) == ("WEBP", (16, 16))
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent: flattened onto white
    assert (_decoded(normalise(rgba, IngestConfig(resolution=8))) == 255).all()


def test_the_source_is_streamed_chunk_by_chunk(tmp_path: Path) -> None:
    # A file removed after the first chunk is committed is found missing: inputs are read as the
    # ingest reaches them (at most two chunks ahead), never all up front.
    src = tmp_path / "src"
    src.mkdir()
    rows = []
    for i in range(40):
        (src / f"{i}.png").write_bytes(encoded(seed=100 + i))
        rows.append({"image": f"{i}.png", "caption": f"caption {i}"})
    with open(src / "captions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    progress: list[tuple[int, int | None]] = []

    def on_progress(done: int, total: int | None) -> None:
        if not progress:
            (src / "39.png").unlink()
        progress.append((done, total))

    report = ingest(src, tmp_path / "ds", CFG, workers=2, chunk_rows=4, on_progress=on_progress)
    assert progress == [(4 * k, None) for k in range(1, 11)]
    assert (report.accepted, report.rejected) == (39, {"missing_file": 1})

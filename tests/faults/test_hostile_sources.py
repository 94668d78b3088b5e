"""Bounded memory on hostile sources: oversized images and tar members are quarantined without
being read, a gzip bomb in a WebDataset shard is skipped in small blocks (a child process's peak
memory stays far below the bomb's size), and shards that are symlinks out of the source are not
followed. Real files, a real gzip stream, a real ingest into a real Parquet dataset."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faultkit import ROOT, base_env, record
from PIL import Image

from storage import dataset, parquet
from storage.config import IngestConfig

pytestmark = pytest.mark.slow  # servers, processes or whole flows: see pyproject's marker

BOMB = 1 << 30  # one GiB of zeros, about 5 MB compressed


def _png(side: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


class _Zeros(io.RawIOBase):
    """``n`` zero bytes, read in blocks: the bomb is written without ever being in memory."""

    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def _reasons(ds) -> dict[str, str]:
    q = dataset.read_quarantine(ds)
    return dict(zip(q.column("key").to_pylist(), q.column("reason").to_pylist()))


def test_oversized_images_and_members_are_quarantined_unread(tmp_path):
    cfg = IngestConfig(max_image_bytes=20_000, max_member_bytes=200)
    small, big = _png(16, 0), _png(128, 1)  # ~1 KB and ~49 KB of random pixels
    assert len(small) < 20_000 < len(big)

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "small.png").write_bytes(small)
    (folder / "big.png").write_bytes(big)
    (folder / "captions.csv").write_text("image,caption\nsmall.png,a small one\nbig.png,a big one\n")
    report = parquet.ingest(folder, tmp_path / "ds-folder", cfg, workers=1)
    assert report.accepted == 1 and _reasons(tmp_path / "ds-folder") == {"big.png": "too_large"}

    pq.write_table(pa.table({"image": [small, big], "caption": ["a small one", "a big one"]}), tmp_path / "cells.parquet")
    report = parquet.ingest(tmp_path / "cells.parquet", tmp_path / "ds-parquet", cfg, workers=1)
    assert report.accepted == 1 and list(_reasons(tmp_path / "ds-parquet").values()) == ["too_large"]

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "shard-0000.tar", "w") as tar:
        _add(tar, "a.png", small)
        _add(tar, "a.txt", b"a small one")
        _add(tar, "b.png", big)
        _add(tar, "b.txt", b"a big one")
        _add(tar, "c.png", small)
        _add(tar, "c.json", json.dumps({"caption": "c", "notes": "x" * 500}).encode())
    report = parquet.ingest(shards, tmp_path / "ds-tar", cfg, workers=1)
    reasons = _reasons(tmp_path / "ds-tar")
    assert report.accepted == 1 and reasons == {"shard-0000.tar:b": "too_large", "shard-0000.tar:c": "too_large"}
    q = dataset.read_quarantine(tmp_path / "ds-tar").to_pylist()
    assert any("member 'b.png' has" in r["message"] and "more than 20000" in r["message"] for r in q)
    record("image file, Parquet cell or tar member above its byte cap (max_image_bytes / max_member_bytes)", "ingest",
           "quarantined `too_large` with the size and the cap, checked before the bytes are read; the rest ingested")


def test_a_gzip_bomb_shard_is_skipped_in_bounded_memory(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "shard-0000.tar", "w:gz", compresslevel=1) as tar:
        _add(tar, "ok.png", _png(16, 0))
        _add(tar, "ok.txt", b"fine")
        info = tarfile.TarInfo("bomb.png")
        info.size = BOMB
        tar.addfile(info, _Zeros(BOMB))
        _add(tar, "bomb.txt", b"boom")
    assert (shards / "shard-0000.tar").stat().st_size < 20_000_000
    # VmHWM: this process image's peak resident memory (ru_maxrss would carry the forking parent's over exec)
    code = (
        "import json, re, sys\n"
        "from storage.config import IngestConfig\n"
        "from storage import parquet\n"
        "r = parquet.ingest(sys.argv[1], sys.argv[2], IngestConfig(), workers=1)\n"
        "peak = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
        "print(json.dumps({'accepted': r.accepted, 'rss_kb': peak}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(shards), str(tmp_path / "ds")], cwd=ROOT, env=base_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["accepted"] == 1
    assert _reasons(tmp_path / "ds") == {"shard-0000.tar:bomb": "too_large"}
    assert result["rss_kb"] * 1024 < BOMB // 2, result  # the GiB was never held
    record("gzip bomb in a WebDataset shard (1 GiB member, ~5 MB compressed)", "ingest",
           f"quarantined `too_large` from the member header; peak memory {result['rss_kb'] // 1024} MiB, the member never held")


def test_shards_that_are_symlinks_out_of_the_source_are_not_followed(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    pq.write_table(pa.table({"image": [_png(16, 2)], "caption": ["secret"]}), outside / "secret.parquet")
    source = tmp_path / "source"
    source.mkdir()
    pq.write_table(pa.table({"image": [_png(16, 3)], "caption": ["mine"]}), source / "mine.parquet")
    (source / "linked.parquet").symlink_to(outside / "secret.parquet")
    report = parquet.ingest(source, tmp_path / "ds", IngestConfig(), workers=1)
    assert report.accepted == 1
    assert dataset.read_images(tmp_path / "ds", columns=["caption"]).column("caption").to_pylist() == ["mine"]
    assert _reasons(tmp_path / "ds") == {"linked.parquet": "path_outside_source"}
    record("a *.parquet / *.tar shard that is a symlink out of the source", "ingest",
           "not followed: quarantined `path_outside_source`; the shards inside are ingested")

"""The Parquet dataset and its quarantine on S3 (``s3://bucket/dataset``), against a real moto S3
server process on loopback that checks request signatures: the same rows and ids as the same ingest
into a local folder, idempotent reruns, no partial part after an interrupted write, and ingests
serialised by the dataset's lease (storage.lease)."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import sys
import threading
import time
from pathlib import Path

import localserver
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage import dataset, lease, location
from storage.config import IngestConfig
from storage.dataset import caption_counts, pin_snapshot, read_images, read_manifest, read_quarantine, snapshot_id
from storage.fingerprint import GENERATION_FILE, store_generation
from storage.parquet import ingest
from storage.settings import Settings
from storage.training_set import load_real_set

pytestmark = pytest.mark.slow  # starts moto's S3 server

CFG = IngestConfig()
TEAM_STACK = Path(__file__).resolve().parents[1] / "team" / "stack.py"


def _team_stack():
    """tests/team/stack.py (its start_s3 / bootstrap_s3), which is on sys.path only under tests/team."""
    if "stack" not in sys.modules:
        spec = importlib.util.spec_from_file_location("stack", TEAM_STACK)
        sys.modules["stack"] = module = importlib.util.module_from_spec(spec)  # its dataclasses look themselves up
        spec.loader.exec_module(module)
    return sys.modules["stack"]


@pytest.fixture(scope="module")
def s3_store(tmp_path_factory):
    stack = _team_stack()
    # moto is pinned in the dev extra the test command installs: missing, the install is broken (a failure, not a skip)
    assert stack.moto_server_exe().exists(), "moto_server is not installed: `python3 run.py test` installs the dev extra"
    log = tmp_path_factory.mktemp("s3") / "s3.log"
    proc, port = stack.start_s3(log)
    try:
        localserver.wait_for(lambda: stack._port_open(port), 60, "the S3 server", [proc], log=log)
        yield stack.bootstrap_s3(proc, port)
    finally:
        localserver.stop_server(proc)


@pytest.fixture
def s3(s3_store, monkeypatch, request):
    """The store, its endpoint and the pipeline's keys in this test's environment (and nothing else
    of AWS's), and a prefix of its own: ``s3.uri``."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_store.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_store.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_store.secret_key)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    s3_store.prefix = request.node.name.replace("[", "-").rstrip("]")
    s3_store.uri = f"s3://{s3_store.bucket}/{s3_store.prefix}/dataset"
    return s3_store


def keys(store, under: str = "") -> list[str]:
    """Every object key under the test's prefix (relative to its dataset), sorted."""
    pages = store.client().get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=f"{store.prefix}/dataset/{under}")
    return sorted(o["Key"][len(f"{store.prefix}/dataset/"):] for page in pages for o in page.get("Contents", []))


def png(colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), ((colour * 37) % 256, (colour * 91) % 256, 7)).save(buffer, "PNG")
    return buffer.getvalue()


def make_source(folder: Path, indices: range, bad: bool = True) -> Path:
    """A folder source of distinct PNGs (every third held out); with ``bad``, three rejected inputs:
    a missing file, a zero-byte file, a duplicate of input 0."""
    folder.mkdir(parents=True)
    rows = []
    for i in indices:
        (folder / f"{i}.png").write_bytes(png(i))
        rows.append({"image": f"{i}.png", "caption": f"caption {i % 3}", "split": "holdout" if i % 3 == 2 else "train"})
    if bad:
        (folder / "empty.png").write_bytes(b"")
        (folder / "dup.png").write_bytes(png(indices[0]))
        rows += [{"image": "gone.png", "caption": "x", "split": "train"}, {"image": "empty.png", "caption": "y", "split": "train"},
                 {"image": "dup.png", "caption": f"caption {indices[0] % 3}", "split": "train"}]
    with open(folder / "captions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_an_ingest_into_s3_reads_back_as_the_same_ingest_into_a_folder_and_a_rerun_changes_nothing(tmp_path, s3):
    src, local = make_source(tmp_path / "src", range(7)), tmp_path / "ds"
    assert not dataset.exists(s3.uri)
    on_s3 = ingest(src, s3.uri, CFG, batch_id="b1", workers=1, chunk_rows=4)
    on_disk = ingest(src, local, CFG, batch_id="b1", workers=1, chunk_rows=4)
    assert on_s3 == on_disk and on_s3.accepted == 7 and sum(on_s3.rejected.values()) == 3
    assert dataset.exists(s3.uri)
    written = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and p.name != ".lock"]
    assert keys(s3) == sorted([GENERATION_FILE, *written])  # the same parts and manifest; the lease released
    assert len(keys(s3, "images/")) == 2 and keys(s3, "quarantine/")

    columns = [c for c in dataset.DATASET_SCHEMA.names if c != "ingested_at"]
    assert read_images(s3.uri, columns=columns).equals(read_images(local, columns=columns))
    assert read_images(s3.uri, columns=["id"], split="holdout").equals(read_images(local, columns=["id"], split="holdout"))
    assert read_quarantine(s3.uri).drop(["recorded_at"]).equals(read_quarantine(local).drop(["recorded_at"]))
    assert caption_counts(s3.uri) == caption_counts(local) == {"caption 0": 3, "caption 1": 2}
    assert snapshot_id(s3.uri) == snapshot_id(local) == on_s3.snapshot_id
    assert pin_snapshot(s3.uri) == pin_snapshot(local) == (on_s3.snapshot_id, 7)
    manifest = read_manifest(s3.uri, on_s3.snapshot_id)
    strip = lambda m: [{k: f[k] for k in ("path", "rows")} for f in m["files"]]  # noqa: E731 - sizes: the timestamps differ
    assert strip(manifest) == strip(read_manifest(local, on_s3.snapshot_id))
    assert dataset.manifest_path(s3.uri, on_s3.snapshot_id) == f"{s3.uri}/snapshots/{on_s3.snapshot_id}.json"
    settings = Settings(dataset_uri=s3.uri)
    assert settings.dataset_uri == s3.uri  # a URI, not a Path (s3:/bucket/...)
    assert load_real_set(settings.dataset_uri, 8, None, on_s3.snapshot_id).images.shape == (5, 8, 8, 3)

    before = keys(s3)
    again = ingest(src, s3.uri, CFG, workers=1, chunk_rows=4)
    assert (again.accepted, again.unchanged, again.rejected, again.snapshot_id) == (0, 7, on_s3.rejected, on_s3.snapshot_id)
    assert keys(s3) == before  # nothing written, the lease gone again
    # a later ingest adds to the pinned snapshot's dataset; the snapshot still reads its own rows
    ingest(make_source(tmp_path / "more", range(7, 9), bad=False), s3.uri, CFG, workers=1)
    assert read_images(s3.uri, columns=["id"], snapshot=on_s3.snapshot_id).num_rows == 7
    assert read_images(s3.uri, columns=["id"]).num_rows == 9


def test_an_interrupted_part_write_leaves_no_partial_part_and_the_rerun_completes(tmp_path, s3, monkeypatch):
    src = make_source(tmp_path / "src", range(6), bad=False)
    real_client = location.s3_client()
    puts = {"parts": 0}

    class Failing:  # the client, whose second part PUT fails as a connection cut mid-upload does
        def __getattr__(self, name):
            return getattr(real_client, name)

        def put_object(self, **kwargs):
            if "/part-" in kwargs["Key"]:
                puts["parts"] += 1
                if puts["parts"] == 2:
                    raise ConnectionResetError("connection reset by peer mid-upload")
            return real_client.put_object(**kwargs)

    monkeypatch.setattr(location, "s3_client", lambda: Failing())
    with pytest.raises(ConnectionResetError):
        ingest(src, s3.uri, CFG, batch_id="crash", workers=1, chunk_rows=2)
    monkeypatch.setattr(location, "s3_client", lambda: real_client)  # the store is back

    assert keys(s3, "images/") == ["images/part-crash-00000.parquet"]  # the failed PUT left nothing
    assert ".lock" not in keys(s3)  # released on the way out
    assert read_images(s3.uri, columns=["id"]).num_rows == 2
    report = ingest(src, s3.uri, CFG, batch_id="resume", workers=1, chunk_rows=2)
    assert (report.accepted, report.unchanged, report.total_rows) == (4, 2, 6)
    for key in keys(s3, "images/"):  # each part is complete: its footer reads, its rows are all there
        body = s3.client().get_object(Bucket=s3.bucket, Key=f"{s3.prefix}/dataset/{key}")["Body"].read()
        assert pq.read_table(io.BytesIO(body)).num_rows == 2
    assert snapshot_id(s3.uri) == report.snapshot_id


def test_two_concurrent_ingests_serialise_on_the_lease(tmp_path, s3, monkeypatch):
    first, second = make_source(tmp_path / "a", range(0, 6), bad=False), make_source(tmp_path / "b", range(3, 9), bad=False)
    real_hold, held = lease.hold, []

    def recorded(*args, **kwargs):  # when each ingest asked for the lease, got it and gave it back
        asked = time.monotonic()
        with real_hold(*args, **kwargs) as it:
            got = time.monotonic()
            time.sleep(0.3)  # long enough for the other one to be waiting
            yield it
        held.append((asked, got, time.monotonic()))

    monkeypatch.setattr(lease, "hold", contextlib.contextmanager(recorded))
    start, reports = threading.Barrier(2), {}

    def run(name, src):
        start.wait()
        reports[name] = ingest(src, s3.uri, CFG, batch_id=name, workers=1)

    threads = [threading.Thread(target=run, args=(name, src)) for name, src in (("a", first), ("b", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(reports) == ["a", "b"]
    (_, got1, done1), (asked2, got2, _) = sorted(held, key=lambda h: h[1])
    assert asked2 < done1 <= got2  # the second asked while the first held the lease, and got it only after
    later = reports["a"] if reports["a"].unchanged else reports["b"]
    assert (later.accepted, later.unchanged) == (3, 3)  # it saw every row the first one wrote
    ids = read_images(s3.uri, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 9


def test_a_crashed_holders_lease_expires_and_a_lost_lease_stops_its_holder(s3):
    bucket, key = s3.bucket, f"{s3.prefix}/dataset/.lock"
    crashed = json.dumps({"holder": "gone", "ttl_s": 1}).encode()
    s3.client().put_object(Bucket=bucket, Key=key, Body=crashed)  # never renewed, never released
    started = time.monotonic()
    with lease.hold(bucket, key, ttl_s=0.6) as held:
        assert 1 <= time.monotonic() - started < 10  # waited for the expiry (server clock: whole seconds)
        held.check()
        s3.client().delete_object(Bucket=bucket, Key=key)  # taken over by another claimant meanwhile
        s3.client().put_object(Bucket=bucket, Key=key, Body=b'{"holder": "next", "ttl_s": 60}')
        time.sleep(0.5)  # one renewal (every ttl/3) finds it replaced
        with pytest.raises(lease.LeaseLost, match="lost while held"):
            held.check()
    assert s3.client().get_object(Bucket=bucket, Key=key)["Body"].read() == b'{"holder": "next", "ttl_s": 60}'  # left to it


def test_the_store_generation_of_an_s3_prefix_changes_when_it_is_recreated(s3):
    gen = store_generation(s3.uri)
    assert gen == store_generation(s3.uri) and len(gen) == 32
    s3.client().delete_object(Bucket=s3.bucket, Key=f"{s3.prefix}/dataset/{GENERATION_FILE}")  # the prefix emptied
    assert store_generation(s3.uri) != gen


def test_s3_uris_carry_no_credentials_or_options():
    with pytest.raises(ValueError, match="environment") as err:
        location.Location.of("s3://key:secret@bucket/dataset")
    assert "secret" not in str(err.value)
    with pytest.raises(ValueError, match="environment"):
        location.Location.of("s3://bucket/dataset?endpoint_override=x")


def test_a_client_made_after_the_keys_changed_signs_with_the_new_keys(monkeypatch):
    from storage.location import s3_client

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never contacted: clients connect lazily
    for key in ("AKIAFIRSTKEY", "AKIASECONDKEY"):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"secret-of-{key}")
        assert s3_client()._request_signer._credentials.access_key == key

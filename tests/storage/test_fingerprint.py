"""Cache-key identities: a source's fingerprint and a store's generation id."""

import os

from storage.fingerprint import GENERATION_FILE, source_fingerprint, store_generation
from storage.links import has_scheme


def test_fingerprint_changes_with_any_file_and_only_then(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "captions.csv").write_text("image,caption\nimages/a.png,a\n")
    (src / "images" / "a.png").write_bytes(b"x" * 10)
    first = source_fingerprint(src)
    assert source_fingerprint(src) == first

    (src / "images" / "b.png").write_bytes(b"y")
    added = source_fingerprint(src)
    assert added != first

    st = (src / "images" / "b.png").stat()
    os.utime(src / "images" / "b.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert source_fingerprint(src) != added  # touched: same size, new mtime

    assert source_fingerprint(tmp_path / "absent").startswith("missing:")
    assert source_fingerprint("s3://bucket/data") == "uri:s3://bucket/data"


def test_fingerprint_does_not_follow_symlinks(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (src / "link").symlink_to(outside, target_is_directory=True)
    before = source_fingerprint(src)
    (outside / "big.bin").write_bytes(b"z" * 100)
    assert source_fingerprint(src) == before


def test_store_generation_is_stable_until_the_store_is_replaced(tmp_path):
    store = tmp_path / "lancedb"
    gen = store_generation(store)
    assert gen == store_generation(store) and (store / GENERATION_FILE).exists()
    assert not [p for p in store.iterdir() if p.name.endswith(".tmp")]
    (store / GENERATION_FILE).unlink()
    store.rmdir()
    assert store_generation(store) != gen
    # s3:// stores hold a generation object (tests/storage/test_dataset_s3.py); other URIs are their own id
    assert store_generation("gs://bucket/lancedb") == "uri:gs://bucket/lancedb"


def test_uri_or_path_is_decided_by_the_scheme_alone(tmp_path):
    # one rule for every store and source location (fingerprints, LanceDB, MLflow artifact roots)
    assert has_scheme("s3://bucket/data") and has_scheme("file:///tmp/x") and has_scheme("gs+x.y-z://b")
    assert not has_scheme("C:\\data") and not has_scheme("c://data")
    odd = f"{tmp_path}/a://b"  # a local path that holds "://" is still a local path
    assert not has_scheme(odd)
    assert source_fingerprint(odd).startswith("missing:")

"""``pogdiff index`` and ``pogdiff neighbours`` on a real Parquet dataset and LanceDB store."""

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from clirunner import run_cli
from PIL import Image

from pogdiff.embedders import make_embedder
from pogdiff.index import with_graph
from storage import vectors
from storage.config import IngestConfig
from storage.parquet import ingest
from tasks.config import load_config

CAPTIONS = {"a red circle": 6, "a small red circle": 1, "a red circle on grey": 1, "a green cross": 3, "a blue square": 2}


@pytest.fixture
def pogdiff(capfd):
    return lambda *args, home: run_cli(list(args), capfd, POGDIFF_HOME=str(home))


def _source(folder: Path) -> Path:
    """Distinct 16x16 images: red-ish for the red circles, other colours for the rest."""
    rng = np.random.default_rng(0)
    colour = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    rows = []
    for caption, n in CAPTIONS.items():
        base = next(v for k, v in colour.items() if k in caption)
        for j in range(n):
            pixels = np.clip(np.array(base) + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            name = f"{len(rows)}.png"
            Image.fromarray(pixels).save(folder / name)
            rows.append({"image": name, "caption": caption})
    with open(folder / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_index_then_neighbours_explain_the_weight(pogdiff, tmp_path, monkeypatch):
    home = tmp_path / "home"
    src = tmp_path / "src"
    src.mkdir()
    ingest(_source(src), home / "dataset", IngestConfig())

    out = pogdiff("index", home=home)
    assert out.returncode == 0, out.stderr
    assert "captions: 5 — embedded 5, reused 0" in out.stdout
    assert "exact top-5" in out.stdout and "5 rows recomputed" in out.stdout and "13 features computed" in out.stdout
    again = pogdiff("index", "--json", home=home)
    report = json.loads(again.stdout)
    # unchanged data: the stored exact graph seeds the update, and no row can change
    assert (report["captions"]["embedded"], report["captions"]["reused"], report["captions"]["written"]) == (0, 5, 0)
    assert (report["captions"]["recomputed"], report["captions"]["deleted"]) == (0, 0)
    assert report["images"]["computed"] == 0

    from pogdiff.pipelines import loader

    def no_base(*args, **kwargs):
        raise AssertionError("neighbours loaded the base model")

    monkeypatch.setattr(loader, "load_pipeline", no_base)  # its feature's name is in the index
    shown = pogdiff("neighbours", "a small red circle", "-k", "2", home=home)
    assert shown.returncode == 0, shown.stderr
    assert "1 training image;" in shown.stdout and "mean of clip(cos, 0, 1)" in shown.stdout
    data = json.loads(pogdiff("neighbours", "a small red circle", "-k", "2", "--json", home=home).stdout)
    assert data["in_dataset"] and data["count"] == 1 and len(data["neighbours"]) == 2
    nb = {r["caption"]: r for r in data["neighbours"]}
    assert "a red circle" in nb
    red = nb["a red circle"]
    assert 0 < red["s_img"] <= 1 and red["count"] == 6
    assert data["image_feature"].startswith("unet:") and 0 < data["tau"] < 1  # the default base's UNet feature
    # without a threshold, a = 1 and constant w(t): psi = lam * mean s_img * (rho / mean rho)^-b
    cfg = tmp_path / "open.yaml"
    cfg.write_text("train:\n  pog:\n    lam: 2.0\n    a: 1.0\n    b: 0.5\n    similarity_quantile: 0.0\n")
    opened = json.loads(pogdiff("neighbours", "a small red circle", "-k", "2", "--json", "--config", str(cfg), home=home).stdout)
    red_open = {r["caption"]: r for r in opened["neighbours"]}["a red circle"]
    assert opened["tau"] == 0.0
    assert red_open["psi"] == pytest.approx(2.0 * red_open["s_img"] * opened["density_ratio"] ** -0.5, rel=1e-5)
    # with the default threshold psi only counts pairs above tau, rescaled: never more than without it
    assert red["psi"] * 2.0 / data["lam"] <= red_open["psi"] + 1e-9

    unseen = json.loads(pogdiff("neighbours", "a large red circle", "--json", home=home).stdout)
    assert not unseen["in_dataset"] and unseen["count"] == 0

    monkeypatch.undo()  # index computes features again below: that needs the base

    # above ann_threshold the graph is ANN and its faiss index is stored next to the table; the next run
    # with a new caption updates both: only the new row is searched, the rows it reaches are patched
    ann = tmp_path / "ann.yaml"
    ann.write_text("index:\n  ann_threshold: 3\n")
    first = json.loads(pogdiff("index", "--json", "--config", str(ann), home=home).stdout)["captions"]
    assert first["mode"] == "ann" and first["graph_update"].startswith("full: no stored ANN graph") and first["recomputed"] == 5
    assert (home / "lancedb" / "_pogdiff_ann" / "captions.faiss").is_file()
    more = tmp_path / "more"
    more.mkdir()
    Image.fromarray(np.full((16, 16, 3), (190, 40, 40), np.uint8)).save(more / "0.png")
    (more / "captions.csv").write_text("image,caption\n0.png,a tiny red circle\n")
    ingest(more, home / "dataset", IngestConfig())
    second = json.loads(pogdiff("index", "--json", "--config", str(ann), home=home).stdout)["captions"]
    assert (second["graph_update"], second["embedded"], second["recomputed"]) == ("incremental", 1, 1) and second["patched"] > 0
    # six captions fit one IVF list, so the search is exhaustive and the updated graph is the exact one
    cfg = load_config(str(ann)).index
    stored = vectors.read_caption_graph(str(home / "lancedb"), make_embedder(cfg).key, cfg)
    exact = with_graph(replace(stored, vectors=stored.vectors.copy(), counts=stored.counts.copy()), cfg)  # Arrow arrays are read-only
    np.testing.assert_array_equal(stored.nb_index, exact.nb_index)
    np.testing.assert_allclose(stored.density, exact.density, rtol=1e-5)
    assert unseen["neighbours"][0]["caption"] in {"a red circle", "a small red circle", "a red circle on grey"}
    assert all(r["psi"] is None for r in unseen["neighbours"])  # no images of its own: no s_img


def test_index_on_an_empty_dataset_is_one_line(pogdiff, tmp_path):
    out = pogdiff("index", home=tmp_path / "home")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset") and str(tmp_path / "home" / "dataset") in lines[0]

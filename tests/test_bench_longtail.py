"""The long-tail benchmark: its arithmetic (pogdiff/longtail.py) and a --quick run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from clirunner import Result

from pogdiff.config import PoGConfig
from pogdiff.longtail import aggregate, competence_check, goal_check, markdown_table, no_harm_check, pair_similarity, psi_by_bucket
from pogdiff.neighbours import NeighbourGraph



@pytest.fixture
def bench(capfd, prefect_api):
    """``python -m bench.longtail ARGS`` in process; its `pogdiff tune` subprocess reports to the
    session's Prefect server instead of starting an ephemeral one."""
    def run(*args: str) -> Result:
        from bench.longtail import main

        capfd.readouterr()
        code = main([*args, "--prefect-api-url", prefect_api])
        out, err = capfd.readouterr()
        return Result(code, out, err)
    return run


def _agg(pog_few: list[float], base_few: list[float], pog_many: list[float], base_many: list[float]) -> dict:
    runs = {}
    for name, few, many in (("pogdiff", pog_few, pog_many), ("vanilla", base_few, base_many), ("cbdm", base_few, base_many)):
        runs[name] = [{"few/grecall": f, "few/accuracy": f, "many/grecall": m, "many/accuracy": m} for f, m in zip(few, many)]
    return aggregate(runs)


def test_aggregate_gives_mean_sample_std_and_values_and_skips_missing() -> None:
    agg = aggregate({"vanilla": [{"few/grecall": 0.1, "few/frechet_pixels16": 3.0}, {"few/grecall": 0.3}]})
    g = agg["vanilla"]["few"]["grecall"]
    assert g["values"] == [0.1, 0.3]
    assert g["mean"] == pytest.approx(0.2)
    assert g["std"] == pytest.approx(math.sqrt(0.02))  # ddof = 1
    assert agg["vanilla"]["few"]["frechet_pixels16"] == {"mean": 3.0, "std": 0.0, "values": [3.0]}


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


def test_no_harm_tolerates_one_std_and_names_what_failed() -> None:
    agg = _agg([0.5, 0.6], [0.5, 0.6], [0.80, 0.90], [0.86, 0.90])  # many: -0.03 against a std of 0.071: fine
    assert no_harm_check(agg, "pogdiff", "vanilla", ("many", "few"), ("accuracy",))["met"]
    worse = _agg([0.5, 0.6], [0.5, 0.6], [0.60, 0.62], [0.90, 0.91])
    result = no_harm_check(worse, "pogdiff", "vanilla", ("many", "few"), ("grecall", "accuracy"))
    assert not result["met"]
    assert {(c["bucket"], c["metric"]) for c in result["checks"] if not c["passed"]} == {("many", "grecall"), ("many", "accuracy")}
    assert not no_harm_check(worse, "pogdiff", "vanilla", ("medium",), ("accuracy",))["met"]  # missing: fails

def _graph() -> tuple[NeighbourGraph, list[str]]:
    # caption 0: 8 images, caption 1: 2 images, neighbours of each other, identical image features
    caption_of = torch.tensor([0] * 8 + [1] * 2)
    feats = torch.nn.functional.normalize(torch.ones(10, 4), dim=1)
    g = NeighbourGraph.build(caption_of, torch.tensor([[1], [0]]), torch.tensor([[0.9], [0.9]]), torch.tensor([8.0, 2.0]), feats)
    return g, ["many", "few"]


def test_psi_by_bucket_follows_the_density_factor_and_vanishes_with_lambda_zero() -> None:
    g, buckets = _graph()
    stats = psi_by_bucket(g, buckets, PoGConfig(lam=1.0, b=0.5, similarity_quantile=0.0), 1000, draws=4000)
    ratio = g.density_ratio
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


@pytest.mark.slow
def test_quick_run_tunes_validates_and_resumes(bench, tmp_path: Path) -> None:
    """One variant end to end: `pogdiff tune` on the validation split, CBDM's tau, then the test runs;
    a run already in the work folder (marked with numbers no real run gives) is kept, not redone."""
    work, out = tmp_path / "work", tmp_path / "out"
    state = tmp_path / "state"
    first = bench("--quick", "--captions", "per-image", "--methods", "vanilla", "--work", str(work), "--state", str(state), "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    lines = (state / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1  # vanilla alone needs no validation
    row = json.loads(lines[0])
    marked = {**row, "metrics": {k: 7.0 for k in row["metrics"]}}
    (state / "results.jsonl").write_text(json.dumps(marked) + "\n")

    run = bench("--quick", "--captions", "per-image", "--work", str(work), "--state", str(state), "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((out / "longtail_vanilla_cbdm_pogdiff_pogdiff_tuned_per-image.json").read_text())
    v = doc["variants"]["per-image"]
    assert set(v["results"]) == {"vanilla", "cbdm", "pogdiff", "pogdiff_tuned"}
    assert v["results"]["vanilla"]["few"]["accuracy"]["mean"] == 7.0  # the finished run was kept
    val = v["validation"]
    assert val["tune"]["reference"]["metrics"] and len(val["tune"]["trials"]) == 1 and "| ref |" in val["tune"]["table"]
    assert set(val["cbdm"]["taus"]) == {"0.1", "1.0"}  # the quick sweep and v["methods"]["cbdm"]["cbdm_tau"] == val["cbdm"]["chosen_tau"]
    assert v["methods"]["pogdiff"] == PoGConfig(method="pogdiff").model_dump()  # the documented defaults
    assert v["methods"]["pogdiff_tuned"] == val["tune"]["pog"]
    assert v["per_seed"]["pogdiff"][0]["psi_mean"] > 0 and v["per_seed"]["vanilla"][0]["psi_mean"] == 0
    psi = v["diagnostics"]["psi_by_bucket"]["pogdiff"]["overall"]
    assert {"psi_q1", "psi_q4", "tau", "active_share"} <= set(psi)
    relations = {"same_individual", "same_colour", "same_shape", "unrelated"}
    assert set(v["diagnostics"]["s_img_by_relation"]) == relations
    assert v["data"]["grouped_by"] == "individual" and v["data"]["individuals"] == 24
    assert doc["smoke"] and v["goals"] == {} and v["competence"] is None  # no verdicts on a smoke run's noise
    assert doc["runtime_s"] > 0 and doc["limit_s"] == 9000 and doc["command"].startswith("python -m bench.longtail --quick")
    table = (out / "longtail_vanilla_cbdm_pogdiff_pogdiff_tuned_per-image.md").read_text()
    assert "## per-image captions" in table and "CBDM on the validation split" in table
    assert (out / "longtail_per-image.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(run.stdout)["bench"] == "longtail"
    # a third invocation redoes nothing: the tune is done, every run is in the work folder
    again = bench("--quick", "--captions", "per-image", "--work", str(work), "--state", str(state), "--out", str(out))
    assert again.returncode == 0 and "seed 0:" not in again.stderr and "pogdiff tune on" not in again.stderr

def test_competence_needs_a_competent_head_and_a_visible_tail() -> None:
    def agg(many: float, few: float, overall: float) -> dict:
        return aggregate({"vanilla": [{"many/accuracy": many, "few/accuracy": few, "overall/accuracy": overall}]})

    assert competence_check(agg(0.95, 0.75, 0.80))["met"]
    failed = {c["check"] for c in competence_check(agg(0.89, 0.70, 0.80))["checks"] if not c["passed"]}
    assert failed == {"many/accuracy >= 0.90"}
    failed = {c["check"] for c in competence_check(agg(0.95, 0.85, 0.69))["checks"] if not c["passed"]}
    assert failed == {"overall/accuracy >= 0.70", "many/accuracy - few/accuracy >= 0.15"}
    assert not competence_check(aggregate({"cbdm": [{"many/accuracy": 1.0}]}))["met"]  # no vanilla values

"""The long-tail benchmark: its arithmetic (pogdiff/longtail.py) and a --quick run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from clirunner import Result

from pogdiff.config import PoGConfig
from pogdiff.longtail import aggregate, claim_check, competence_check, markdown_table, no_harm_check, pair_similarity, psi_by_bucket, role_table
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

def _ladder(pog: list[float], base: list[float], control: list[float], copy_pog=(0.1, 0.1), copy_base=(0.1, 0.1),
            many_pog=(0.95, 0.95)) -> dict:
    def seeds(few, copy, many):
        return [{"few/holdout_accuracy": f, "few/holdout_grecall": 0.2, "few/copy_rate": c, "many/accuracy": m}
                for f, c, m in zip(few, copy, many)]
    return aggregate({"pogdiff_balanced": seeds(pog, copy_pog, many_pog), "balanced": seeds(base, copy_base, (0.95, 0.95)),
                      "random_neighbour": seeds(control, (0.1, 0.1), (0.95, 0.95))})


def test_the_claim_needs_a_gain_beyond_noise_no_more_copying_a_kept_head_and_controls_below() -> None:
    assert claim_check(_ladder([0.8, 0.82], [0.6, 0.62], [0.6, 0.6]), "pogdiff_balanced", "balanced", ("random_neighbour",))["met"]

    def failed(agg) -> set[str]:
        return {c["what"] for c in claim_check(agg, "pogdiff_balanced", "balanced", ("random_neighbour",))["checks"] if not c["passed"]}

    assert failed(_ladder([0.7, 0.5], [0.6, 0.6], [0.2, 0.2])) == {"gain"}  # +0.0 mean, and the seeds spread 0.14
    assert failed(_ladder([0.8, 0.82], [0.6, 0.62], [0.8, 0.82])) == {"control random_neighbour"}  # any neighbour does as well
    assert failed(_ladder([0.8, 0.82], [0.6, 0.62], [0.6, 0.6], copy_pog=(0.5, 0.5))) == {"copy few/copy_rate"}
    assert failed(_ladder([0.8, 0.82], [0.6, 0.62], [0.6, 0.6], many_pog=(0.9, 0.9))) == {"head many/accuracy"}
    balancing = aggregate({"repeats": [{"few/accuracy": 0.9, "many/accuracy": 0.94}] * 2 + [{"few/accuracy": 0.92, "many/accuracy": 0.94}],
                           "vanilla": [{"few/accuracy": 0.7, "many/accuracy": 0.95}] * 3})
    assert claim_check(balancing, "repeats", "vanilla", (), metrics=("accuracy",), copy_metric=None)["met"]


def test_role_table_averages_a_role_over_its_products_then_over_seeds() -> None:
    def rows(a: float, b: float, c: float) -> list[dict]:
        return [{"individual": "Vexo Gesh", "bucket": "few", "holdout_accuracy": a},
                {"individual": "Pirko Vimb", "bucket": "few", "holdout_accuracy": b},
                {"individual": "Nembo", "bucket": "few", "holdout_accuracy": c},
                {"individual": "Vexo", "bucket": "many", "holdout_accuracy": 1.0}]
    roles = {"Vexo Gesh": "colour_variant", "Pirko Vimb": "colour_variant", "Nembo": "control", "Vexo": "head"}
    table = role_table({"vanilla": [rows(0.2, 0.4, 0.5), rows(0.4, 0.6, None)]}, roles, ("holdout_accuracy",))
    assert "| vanilla | colour_variant | 0.400 ± 0.141 |" in table  # seed means 0.3 and 0.5
    assert "| vanilla | control | 0.500 ± 0.000 |" in table  # the second seed has no value: left out
    assert "head" not in table  # not in the few bucket


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
    """One variant end to end: `pogdiff tune` on the validation split, CBDM's tau, then the ladder's
    test runs with held-out prompts; a run already in the state folder (marked with numbers no real
    run gives) is kept, not redone."""
    work, out = tmp_path / "work", tmp_path / "out"
    state = tmp_path / "state"
    first = bench("--quick", "--variants", "per-image", "--methods", "vanilla", "--work", str(work), "--state", str(state), "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    lines = (state / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1  # vanilla alone needs no validation
    row = json.loads(lines[0])
    assert {"few/holdout_accuracy", "few/copy_rate", "few/prompt_fidelity"} <= set(row["metrics"])  # held-out prompts scored
    marked = {**row, "metrics": {k: 7.0 for k in row["metrics"]}}
    (state / "results.jsonl").write_text(json.dumps(marked) + "\n")

    run = bench("--quick", "--variants", "per-image", "--work", str(work), "--state", str(state), "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((out / "longtail_per-image.json").read_text())
    v = doc["variants"]["per-image"]
    assert {"vanilla", "repeats", "sqrt", "cbdm", "pogdiff_tuned"} <= set(v["results"])
    assert v["results"]["vanilla"]["few"]["accuracy"]["mean"] == 7.0  # the finished run was kept
    val = v["validation"]
    tune = val["tune"]
    assert len(tune["reference"]["seed_scores"]) == 2 and len(tune["trials"]) == 1  # the reference on two seeds: its noise
    assert "| ref |" in tune["table"] and "Noise:" in tune["table"]
    assert set(val["cbdm"]["taus"]) == {"0.1", "1.0"} and v["methods"]["cbdm"]["pog"]["cbdm_tau"] == val["cbdm"]["chosen_tau"]
    assert (v["methods"]["repeats"]["sampling"], v["methods"]["sqrt"]["sampling"]) == ("repeats", "sqrt")
    balanced = tune["best_balanced_borrowing"] is not None
    assert ({"balanced", "pogdiff_balanced", "random_neighbour", "self_target"} <= set(v["results"])) == balanced
    assert balanced or "balances exposure and borrows" in v["notes"]["pogdiff_balanced"]
    # exposure balancing shows in the views each training photo got: the rare are seen more often
    views = {m: v["exposure"][m] for m in ("vanilla", "repeats")}
    assert views["repeats"]["few"] > views["vanilla"]["few"]
    assert v["data"]["holdout"] == 4 * 24 and v["data"]["grouped_by"] == "individual" and v["data"]["individuals"] == 24
    assert doc["smoke"] and v["goals"] == {} and v["competence"] is None  # no verdicts on a smoke run's noise
    assert doc["runtime_s"] > 0 and doc["command"].startswith("python -m bench.longtail --quick")
    table = (out / "longtail_per-image.md").read_text()
    assert "## per-image" in table and "holdout_accuracy" in table and "CBDM on the validation split" in table
    for png in ("longtail_per-image.png", "longtail_per-image_tradeoff.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (work / "per-image" / "grids" / "repeats-seed0.png").exists()  # the held-out grid to look at
    assert json.loads(run.stdout)["bench"] == "longtail"
    # a third invocation redoes nothing: the tune is done, every run is in the state folder
    again = bench("--quick", "--variants", "per-image", "--work", str(work), "--state", str(state), "--out", str(out))
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

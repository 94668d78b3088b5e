"""The model lifecycle: the promotion gate, champion/challenger aliases, `pogdiff models` and `pogdiff promote`.

The gate is tested as the pure function ``decide`` case by case, then end to end on a real
SQLite MLflow store through the register task's own function (``register_model.fn``) and the
command line (``flows.cli.main``, tests/clirunner.py).
"""

from __future__ import annotations

import json
import math
import random
import uuid
from pathlib import Path

import lancedb
import pyarrow as pa
import pytest
import torch
import yaml
from clirunner import run_cli
from mlflow import MlflowClient
from prefect.logging import disable_run_logger

from pogdiff.config import ConfigError
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from storage.config import GateConfig, RegisterConfig
from storage.gate import decide
from storage.mlflow import connection, registry, runs
from storage.settings import Settings, load_settings
from tasks.config import parse_config
from tasks.register import register_model
from tasks.results import Registration

ROOT = Path(__file__).resolve().parents[2]
FEW, FRECHET, HEAD = "few/grecall", "overall/frechet_pixels16", "many/accuracy"


def m(grecall: float | None = None, frechet: float | None = None) -> dict[str, float]:
    out = {"few/accuracy": 0.9, HEAD: 0.9}
    if grecall is not None:
        out[FEW] = grecall
    if frechet is not None:
        out[FRECHET] = frechet
    return out


# ----------------------------------------------------------------------------------- the gate


# relative: the Fréchet distance may worsen by 10 %; the head check has its own test below
GATE = GateConfig(min_improvement=0.05, max_worsening=0.1, head_metric=None)


@pytest.mark.parametrize(
    ("new", "champion", "promoted", "statuses", "in_reason"),
    [
        # better: gRecall gains >= 0.05 and the Fréchet distance worsens by <= 10 % of 20
        (m(0.60, 21.0), m(0.50, 20.0), True, {FEW: "passed", FRECHET: "passed"}, "gain +0.1 >= required 0.05"),
        (m(0.60, 18.0), m(0.50, 20.0), True, {FEW: "passed", FRECHET: "passed"}, "worsened by -2 <= allowed 2"),
        # worse gRecall
        (m(0.40, 20.0), m(0.50, 20.0), False, {FEW: "failed", FRECHET: "passed"}, "gain -0.1 < required 0.05"),
        # better gRecall but the Fréchet distance worse by more than epsilon
        (m(0.70, 22.5), m(0.50, 20.0), False, {FEW: "passed", FRECHET: "failed"}, "worsened by +2.5 > allowed 2"),
        # equal: no gain, so not promoted under a positive min_improvement
        (m(0.50, 20.0), m(0.50, 20.0), False, {FEW: "failed", FRECHET: "passed"}, "gain +0 < required 0.05"),
        # exactly the required gain passes despite float rounding (0.09 - 0.04 = 0.049999999999999996)
        (m(0.09, 20.0), m(0.04, 20.0), True, {FEW: "passed", FRECHET: "passed"}, ">= required 0.05"),
        # missing gate metric on either side: recorded, rejected
        (m(None, 20.0), m(0.50, 20.0), False, {FEW: "missing", FRECHET: "passed"}, "few/grecall missing on the new version"),
        (m(0.90, 20.0), m(None, 20.0), False, {FEW: "missing", FRECHET: "passed"}, "few/grecall missing on champion v3"),
        (m(float("nan"), 20.0), m(0.50, 20.0), False, {FEW: "missing", FRECHET: "passed"}, "missing on the new version"),
        # missing guard metric: rejected by default (missing_guard="reject")
        (m(0.90), m(0.50, 20.0), False, {FEW: "passed", FRECHET: "missing"}, "guard overall/frechet_pixels16 missing on the new version"),
        (m(0.90), m(0.50), False, {FEW: "passed", FRECHET: "missing"}, "missing on the new version and champion v3"),
    ],
)
def test_gate_cases(new, champion, promoted, statuses, in_reason):
    result = decide(GATE, new, champion, "3")
    assert result.promoted is promoted
    assert {k: c.status for k, c in result.checks.items()} == statuses
    assert in_reason in result.reason and result.reason.endswith("(champion v3)")


def test_gate_records_the_numbers_it_used():
    result = decide(GATE, m(0.6, 21.0), m(0.5, 20.0), "3")
    few, frechet = result.checks[FEW], result.checks[FRECHET]
    assert (few.role, few.new, few.champion, few.limit) == ("metric", 0.6, 0.5, 0.05)
    assert few.change == pytest.approx(0.1)
    assert (frechet.role, frechet.new, frechet.champion, frechet.change, frechet.limit) == ("guard", 21.0, 20.0, 1.0, 2.0)


def test_gate_without_champion_promotes_even_without_metrics():
    result = decide(GATE, {}, None)
    assert result.promoted and result.reason == "no champion yet"
    assert {k: (c.new, c.status) for k, c in result.checks.items()} == {FEW: (None, "no-champion"), FRECHET: (None, "no-champion")}


def test_gate_options():
    # a tie promotes when min_improvement is 0 ("improves by at least 0")
    assert decide(GateConfig(min_improvement=0), m(0.5, 20), m(0.5, 20), "1").promoted
    # missing guard ignored on request, and the reason says so
    skip = decide(GateConfig(missing_guard="skip"), m(0.9), m(0.5, 20), "1")
    assert skip.promoted and skip.checks[FRECHET].status == "skipped" and "not checked" in skip.reason
    # no guard at all
    assert decide(GateConfig(guard_metric=None), m(0.9), m(0.5), "1").checks.keys() == {FEW, HEAD}
    # absolute worsening, and a lower-is-better gate metric with a higher-is-better guard
    absolute = GateConfig(min_improvement=0.05, max_worsening=1.0, worsening="absolute")
    assert not decide(absolute, m(0.9, 21.5), m(0.5, 20), "1").promoted
    assert decide(absolute, m(0.9, 21.0), m(0.5, 20), "1").promoted
    lower = GateConfig(metric="few/frechet_pixels16", higher_is_better=False, min_improvement=1.0,
                       guard_metric="overall/accuracy", guard_lower_is_better=False, max_worsening=0.02, worsening="absolute",
                       head_metric=None)
    assert decide(lower, {"few/frechet_pixels16": 8.0, "overall/accuracy": 0.89}, {"few/frechet_pixels16": 9.0, "overall/accuracy": 0.9}, "1").promoted
    assert not decide(lower, {"few/frechet_pixels16": 8.5, "overall/accuracy": 0.9}, {"few/frechet_pixels16": 9.0, "overall/accuracy": 0.9}, "1").promoted
    assert not decide(lower, {"few/frechet_pixels16": 5.0, "overall/accuracy": 0.85}, {"few/frechet_pixels16": 9.0, "overall/accuracy": 0.9}, "1").promoted


def test_gate_head_check_never_promotes_a_collapse():
    gate = GateConfig(min_improvement=0.05, max_worsening=0.1)  # the default head check: many/accuracy, drop <= 0.03
    champion = {**m(0.50, 20.0), HEAD: 0.95}
    collapsed = decide(gate, {**m(0.90, 20.0), HEAD: 0.50}, champion, "2")
    assert not collapsed.promoted and collapsed.checks[HEAD].status == "failed"
    assert "head many/accuracy 0.5 vs 0.95: worsened by +0.45 > allowed 0.03" in collapsed.reason
    assert collapsed.checks[HEAD].role == "head" and collapsed.checks[FEW].status == "passed"
    within = decide(gate, {**m(0.90, 20.0), HEAD: 0.925}, champion, "2")
    assert within.promoted and within.checks[HEAD].status == "passed"
    assert decide(gate, {**m(0.90, 20.0), HEAD: 0.99}, champion, "2").promoted  # better head: fine
    headless = {k: v for k, v in m(0.90, 20.0).items() if k != HEAD}
    missing = decide(gate, headless, champion, "2")
    assert not missing.promoted and "head many/accuracy missing on the new version" in missing.reason
    assert decide(gate.model_copy(update={"missing_guard": "skip"}), headless, champion, "2").promoted
    with pytest.raises(ConfigError, match="head_metric must differ"):
        parse_config({"registry": {"gate": {"head_metric": FEW}}})


def test_gate_never_promotes_a_worse_model():
    """Over many random pairs: promoted implies the gate metric gained at least min_improvement and
    the guard worsened by at most the allowed amount."""
    rng = random.Random(0)
    for _ in range(2000):
        new, old = m(rng.random(), rng.uniform(5, 50)), m(rng.random(), rng.uniform(5, 50))
        result = decide(GATE, new, old, "1")
        gain_ok = new[FEW] - old[FEW] >= GATE.min_improvement - 1e-9
        frechet_ok = new[FRECHET] - old[FRECHET] <= GATE.max_worsening * old[FRECHET] + 1e-9
        assert result.promoted == (gain_ok and frechet_ok)


def test_gate_config_is_typed():
    with pytest.raises(ConfigError, match="registry.gate.min_improvement"):
        parse_config({"registry": {"gate": {"min_improvement": -1}}})
    with pytest.raises(ConfigError, match="registry.gate.worsening"):
        parse_config({"registry": {"gate": {"worsening": "percent"}}})
    with pytest.raises(ConfigError, match="unknown config key 'registry.gate_metric'"):
        parse_config({"registry": {"gate_metric": "few/grecall"}})
    with pytest.raises(ConfigError, match="guard_metric must differ"):
        parse_config({"registry": {"gate": {"guard_metric": FEW}}})
    demo = parse_config(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()))
    assert demo.registry.gate == GateConfig(min_improvement=0.01, max_worsening=0.05)


def test_the_gate_reads_only_metrics_the_evaluation_reports():
    # unset, the guard is the overall Fréchet distance of the evaluation's own feature
    assert parse_config({}).registry.gate.guard_metric == "overall/frechet_pixels16"
    dino = parse_config({"evaluate": {"feature_extractor": "dinov2", "feature_model": "models/dinov2-small"}})
    assert dino.registry.gate.guard_metric == "overall/frechet_dinov2"
    # a metric no evaluation logs would leave the check missing on every version: one clear error
    with pytest.raises(ConfigError, match=r"guard_metric 'overall/fid' is not a metric the evaluation reports \(fid is now named"):
        parse_config({"registry": {"gate": {"guard_metric": "overall/fid"}}})
    with pytest.raises(ConfigError, match="frechet_pixels8"):  # the names this evaluation reports
        parse_config({"evaluate": {"feature_size": 8}, "registry": {"gate": {"guard_metric": "overall/frechet_pixels16"}}})
    with pytest.raises(ConfigError, match="registry.gate.head_metric 'top/accuracy'"):
        parse_config({"registry": {"gate": {"head_metric": "top/accuracy"}}})


# ------------------------------------------------------------------------ the lifecycle on a store


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """See tests/storage/test_mlflow.py: one thread is as fast for tiny models on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_spec) -> Settings:
    """An isolated home: SQLite MLflow store, artifact folder, LanceDB captions, a tiny model."""
    root = tmp_path_factory.mktemp("registry")
    db = lancedb.connect(str(root / "lancedb"))
    db.create_table("captions", pa.table({"caption": ["a blue square", "a red circle"], "count": [2, 5]}))
    PixelDiffusionPipeline.new(tiny_spec, seed=0).save_pretrained(root / "model")
    return load_settings(home=root)


def retrain(settings: Settings, cfg: RegisterConfig, metrics: dict[str, float]) -> Registration:
    """What the retrain flow does after evaluation: a run with its metrics, then the register task."""
    connection.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    run_id = runs.start(cfg.experiment)
    with runs.resume(run_id):
        runs.log_metrics(metrics)
    with disable_run_logger():
        decision = register_model.fn(settings, cfg, str(settings.home / "model"), run_id, metrics)
    runs.end(run_id)
    return decision


@pytest.fixture
def pogdiff(capfd):
    """``pogdiff ARGS`` on ``settings``' home, as ``user``."""
    return lambda settings, *args, user="reviewer": run_cli(list(args), capfd, POGDIFF_HOME=str(settings.home), USER=user)


def test_lifecycle_two_retrains_then_models_json(pogdiff, home):
    cfg = RegisterConfig(experiment="lifecycle", model_name=f"life-{uuid.uuid4().hex[:6]}")
    name = cfg.model_name
    first = retrain(home, cfg, m(0.50, 20.0))
    assert (first.version, first.promoted, first.reason) == ("1", True, "no champion yet")
    assert first.champion_metrics == {} and first.model_name == name and first.decided_by == "gate"
    # the second demo run on unchanged data: same numbers, no gain, stays challenger
    second = retrain(home, cfg, m(0.50, 20.0))
    assert (second.version, second.promoted, second.champion_before) == ("2", False, "1")
    assert second.champion_metrics[FEW] == 0.5

    out = pogdiff(home, "models", "--json", "--model", name)
    assert out.returncode == 0, out.stderr
    versions = json.loads(out.stdout)
    assert {v["model"] for v in versions} == {name}
    assert [(v["version"], v["aliases"], v["gate"]["decision"]) for v in versions] == [
        ("2", ["challenger"], "rejected"),
        ("1", ["champion"], "promoted"),
    ]
    assert "gain +0 < required 0.01" in versions[0]["gate"]["reason"]
    assert versions[1]["promoted_by"] == "gate" and versions[0]["promoted_by"] is None
    assert versions[0]["metrics"] == {"few/accuracy": 0.9, HEAD: 0.9, FEW: 0.5, FRECHET: 20.0}
    assert all(v["weights"] == "full" and v["run_id"] and v["created"].endswith("+00:00") for v in versions)

    # the gate's numbers are on the version, where a reviewer sees them
    tags = MlflowClient().get_model_version(name, "2").tags
    assert tags["gate.decision"] == "rejected" and tags["gate.champion_version"] == "1"
    assert (tags[f"gate.{FEW}.new"], tags[f"gate.{FEW}.champion"], tags[f"gate.{FEW}.status"]) == ("0.5", "0.5", "failed")
    assert (tags[f"gate.{FRECHET}.role"], tags[f"gate.{FRECHET}.limit"], tags[f"gate.{FRECHET}.status"]) == ("guard", "1.0", "passed")
    assert json.loads(tags["gate.config"])["min_improvement"] == 0.01

    # better gRecall but the Fréchet distance worse beyond 5 %: a worse model never receives champion
    third = retrain(home, cfg, m(0.80, 25.0))
    assert not third.promoted and "guard overall/frechet_pixels16" in third.reason
    # better on both counts: champion moves
    fourth = retrain(home, cfg, m(0.80, 20.5))
    assert fourth.promoted and fourth.champion_before == "1"
    # evaluation left the guard metric out (e.g. too few images): recorded, rejected
    fifth = retrain(home, cfg, m(0.95))
    assert not fifth.promoted and "guard overall/frechet_pixels16 missing on the new version" in fifth.reason
    model = MlflowClient().get_registered_model(name)
    assert {a: str(v) for a, v in model.aliases.items()} == {"champion": "4", "challenger": "5"}
    assert [d.checks[FEW].status for d in (third, fourth, fifth)] == ["passed", "passed", "passed"]


def test_register_retry_reuses_the_version(home):
    cfg = RegisterConfig(experiment="retry", model_name=f"retry-{uuid.uuid4().hex[:6]}")
    connection.configure(home.mlflow_tracking_uri, home.mlflow_artifact_root)
    run_id = runs.start(cfg.experiment)
    with disable_run_logger():
        first = register_model.fn(home, cfg, str(home.home / "model"), run_id, m(0.5, 20.0))
        again = register_model.fn(home, cfg, str(home.home / "model"), run_id, m(0.5, 20.0))
    runs.end(run_id)
    assert first.version == again.version == "1"
    assert again.promoted and again.reason == "already champion"
    assert [v["version"] for v in registry.list_versions(cfg.model_name)] == ["1"]


def test_promote_by_hand_is_recorded(pogdiff, home):
    cfg = RegisterConfig(experiment="manual", model_name=f"manual-{uuid.uuid4().hex[:6]}")
    name = cfg.model_name
    retrain(home, cfg, m(0.5, 20.0))
    rejected = retrain(home, cfg, m(0.4, 20.0))
    assert not rejected.promoted

    out = pogdiff(home, "promote", "2", "--model", name, "--reason", "looks better on the few bucket", user="alice")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"{name} version 2 -> champion (promoted by hand; champion before: v1): "
                                  "looks better on the few bucket")
    client = MlflowClient()
    tags = client.get_model_version(name, "2").tags
    assert (tags["promoted_by"], tags["promoted_by_user"], tags["promotion_reason"]) == ("manual", "alice", "looks better on the few bucket")
    assert tags["promotion_champion_before"] == "1" and tags["promoted_at"].endswith("+00:00")
    assert tags["gate.decision"] == "rejected"  # the gate's own record is kept
    assert {a: str(v) for a, v in client.get_registered_model(name).aliases.items()} == {"champion": "2", "challenger": "2"}

    listed = pogdiff(home, "models", "--model", name)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == name and lines[1].split() == ["version", "aliases", "gate", "promoted", FEW, FRECHET, "created"]
    assert lines[2].split()[:6] == ["2", "challenger,champion", "rejected", "manual", "0.4", "20"]
    assert "promoted by hand by alice at" in listed.stdout and "gain -0.1 < required 0.01" in listed.stdout

    again = pogdiff(home, "promote", "2", "--model", name)
    assert again.returncode == 0 and "already champion; nothing changed" in again.stdout

    for args, message in (
        (("promote", "9", "--model", name), f"error: cannot resolve '9': registered model {name!r} has no version '9'"),
        (("promote", "retired", "--model", name), f"error: cannot resolve 'retired': registered model {name!r} has no alias 'retired'"),
        (("promote", "champion", "--model", "no-such-model"), "error: cannot resolve 'champion': no registered model named 'no-such-model'"),
    ):
        bad = pogdiff(home, *args)
        assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [message]
    assert math.isclose(registry.champion(name)[1][FEW], 0.4)

    # aliases and NAME@alias name versions too: the rejected third version is the challenger
    assert not retrain(home, cfg, m(0.3, 20.0)).promoted
    by_alias = pogdiff(home, "promote", "challenger", "--model", name, "--reason", "x")
    assert by_alias.returncode == 0, by_alias.stderr
    assert by_alias.stdout.strip() == f"{name} version 3 -> champion (promoted by hand; champion before: v2): x"
    assert pogdiff(home, "promote", f"{name}@champion", "--model", "other").stdout.strip() == \
        f"{name} version 3 is already champion; nothing changed"

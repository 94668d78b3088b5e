"""storage.tracking against a real MLflow store: SQLite database and artifacts in a temp folder.

One store serves the whole module (a fresh SQLite store runs MLflow's migrations, several seconds);
each test uses its own experiment and registered-model names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from pydantic import BaseModel

from pogdiff.config import RetrainConfig
from pogdiff.model import PixelDiffusionPipeline, UNetSpec
from storage import tracking

GATE = "few/grecall"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Logging a model runs a real generation (MLflow's input-example check). On a small machine that
    other processes keep busy, torch's default of one thread per core makes that up to 100x slower
    (threads spin waiting for each other); one thread is as fast for these tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking.configure(uri, str(root / "artifacts"))
    return {"uri": uri, "root": str(root)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pogdiff") / "model"
    spec = UNetSpec(image_size=16, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)
    PixelDiffusionPipeline.new(spec, seed=0).save_pretrained(path)
    return path


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_run_finishes_and_fails(store):
    exp = unique("exp")
    with tracking.run(exp, run_name="ok", tags={"flow_run": "abc"}) as run_id:
        assert mlflow.active_run().info.run_id == run_id
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "ok" and run.data.tags["flow_run"] == "abc"
    # the experiment's artifacts live under the configured root, never in ./mlruns
    artifact_location = MlflowClient().get_experiment_by_name(exp).artifact_location
    assert artifact_location == (Path(store["root"]) / "artifacts" / exp).as_uri()

    with pytest.raises(RuntimeError, match="boom"):
        with tracking.run(exp) as failed_id:
            raise RuntimeError("boom")
    assert MlflowClient().get_run(failed_id).info.status == "FAILED"
    assert mlflow.active_run() is None


class _Inner(BaseModel):
    lam: float = 1.0
    formats: tuple[str, ...] = ("PNG", "JPEG")


class _Outer(BaseModel):
    steps: int = 3
    note: str | None = None
    pog: _Inner = _Inner()
    path: Path = Path("data")


def test_flatten_nested_config():
    assert tracking.flatten(_Outer()) == {
        "steps": "3",
        "note": "None",
        "pog.lam": "1.0",
        "pog.formats": '["PNG", "JPEG"]',
        "path": "data",
    }
    assert tracking.flatten({"train": {"pog": {"lam": 2.0}, "opts": {}}}, prefix="cfg") == {
        "cfg.train.pog.lam": "2.0",
        "cfg.train.opts": "{}",
    }
    flat = tracking.flatten(RetrainConfig())
    assert flat["train.pog.lam"] == "1.0"
    assert flat["evaluate.buckets.few_below"] == "20"


def test_log_config_params_in_batches_and_artifact(store, tmp_path):
    cfg = RetrainConfig()
    many = {f"k{i:03d}": i for i in range(250)}  # more params than MLflow takes in one batch
    with tracking.run(unique("cfg")) as run_id:
        tracking.log_config(cfg)
        tracking.log_config({"extra": many})
    run = MlflowClient().get_run(run_id)
    expected = {**tracking.flatten(cfg), **tracking.flatten({"extra": many})}
    assert run.data.params == expected
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.json", dst_path=str(tmp_path))
    # the second call overwrote the artifact; the first config is fully in params
    assert json.loads(Path(local).read_text()) == {"extra": many}


def test_log_metrics_rejects_nan_and_logs_steps(store):
    with tracking.run(unique("metrics")) as run_id:
        tracking.log_metrics({"loss": 0.5}, step=1)
        tracking.log_metrics({"loss": 0.25}, step=2)
        with pytest.raises(ValueError, match="'few/fid'"):
            tracking.log_metrics({"loss": 0.1, "few/fid": float("nan")}, step=3)
        with pytest.raises(ValueError, match="'psi'"):
            tracking.log_metrics({"psi": None})  # type: ignore[dict-item]
    with pytest.raises(RuntimeError, match="inside tracking.run"):
        tracking.log_metrics({"loss": 0.1})  # no active run: never a stray run in the Default experiment
    history = MlflowClient().get_metric_history(run_id, "loss")
    # nothing of the rejected batch was logged
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]


def test_lineage_records_name_digest_source(store, tmp_path):
    long_digest = "f" * 64  # a full sha256; MLflow keeps 36 characters
    lance_uri = "lancedb:///data/lancedb?table=captions&version=7"
    with tracking.run(unique("lineage")) as run_id:
        tracking.log_lineage("captions@v3", str(tmp_path / "dataset"), "ab12cd34", "training", 120)
        tracking.log_lineage("eval-captions", lance_uri, long_digest, "evaluation", 8)
    inputs = {d.dataset.name: d for d in MlflowClient().get_run(run_id).inputs.dataset_inputs}
    train, evaluation = inputs["captions@v3"], inputs["eval-captions"]
    assert train.dataset.digest == "ab12cd34"
    assert json.loads(train.dataset.source)["uri"] == str(tmp_path / "dataset")
    assert json.loads(train.dataset.profile) == {"num_rows": 120}
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "training"
    assert evaluation.dataset.digest == long_digest[:36]
    assert json.loads(evaluation.dataset.source)["uri"] == lance_uri
    tags = {t.key: t.value for t in evaluation.tags}
    assert tags["mlflow.data.context"] == "evaluation" and tags["digest"] == long_digest


def test_signature_matches_model_inputs():
    from storage import mlflow_model

    sig = tracking.model_signature(16)
    assert [(c.name, c.type.name, c.required) for c in sig.inputs.inputs] == [
        ("prompt", "string", True),
        ("seed", "long", False),
        ("num_images", "long", False),
        ("guidance_scale", "double", False),
        ("num_inference_steps", "long", False),
    ]
    assert list(mlflow_model.OPTIONAL_COLUMNS) == [c.name for c in sig.inputs.inputs][1:]


@pytest.fixture(scope="module")
def registered(store, model_dir) -> tuple[str, list[tuple[str, dict[str, float], str]]]:
    """Three versions of one registered model, each from its own run with its gate metric logged.

    v2 is better than v1 but not by the gate's min_improvement (0.05); v3 is clearly better.
    (Logging a model runs MLflow's input-example check, a real generation, so this is done once.)
    """
    name = unique("gate")
    out = []
    for value in (0.5, 0.52, 0.7):
        with tracking.run(unique("reg")) as run_id:
            metrics = {GATE: value, "overall/fid": 10.0}
            tracking.log_metrics(metrics)
            out.append((tracking.log_model(model_dir, name, ["a red circle"]), metrics, run_id))
    return name, out


def test_log_model_registers_increasing_versions(registered, model_dir):
    name, logged = registered
    assert [v for v, _, _ in logged] == ["1", "2", "3"]
    for version, _, run_id in logged:
        assert MlflowClient().get_model_version(name, version).run_id == run_id
    info = mlflow.models.get_model_info(f"models:/{name}/2")
    assert [c.name for c in info.signature.inputs.inputs][0] == "prompt"
    (output,) = info.signature.outputs.inputs
    assert output.type == np.dtype(np.uint8) and tuple(output.shape) == (-1, 16, 16, 3)
    assert info.saved_input_example_info is not None
    with pytest.raises(RuntimeError, match="inside tracking.run"):
        tracking.log_model(model_dir, name, ["a red circle"])
    with pytest.raises(FileNotFoundError, match="pogdiff.json"):
        tracking.log_model(model_dir.parent, name, ["a red circle"])


def test_promotion_gate_and_fresh_process_load(store, registered, tmp_path):
    name, [(v1, m1, _), (v2, m2, _), (v3, m3, _)] = registered
    client = MlflowClient()
    assert tracking.champion(name) is None
    assert tracking.champion(unique("no-such-model")) is None

    d1 = tracking.promote(name, v1, m1, GATE, min_improvement=0.05)
    assert (d1.promoted, d1.champion_before, d1.champion_value) == (True, None, None)
    assert tracking.champion(name) == ("1", m1)

    d2 = tracking.promote(name, v2, m2, GATE, min_improvement=0.05)
    assert (d2.promoted, d2.champion_before, d2.champion_value, d2.new_value) == (False, "1", 0.5, 0.52)
    tags = client.get_model_version(name, v2).tags
    assert tags["gate.decision"] == "rejected" and tags["gate.metric"] == GATE
    assert tags["gate.new"] == "0.52" and tags["gate.champion"] == "0.5"
    assert "not >" in tags["gate.reason"]
    assert tracking.champion(name)[0] == "1"
    aliases = client.get_registered_model(name).aliases
    assert {alias: str(v) for alias, v in aliases.items()} == {"champion": "1", "challenger": "2"}

    with pytest.raises(ValueError, match="'few/grecall'"):
        tracking.promote(name, v3, {"overall/fid": 3.0}, GATE, min_improvement=0.05)
    d3 = tracking.promote(name, v3, m3, GATE, min_improvement=0.05)
    assert (d3.promoted, d3.champion_before, d3.champion_value) == (True, "1", 0.5)
    assert client.get_model_version(name, v3).tags["gate.decision"] == "promoted"

    listed = tracking.list_versions(name)
    assert [v["version"] for v in listed] == ["3", "2", "1"]
    assert [v["aliases"] for v in listed] == [["challenger", "champion"], [], []]
    assert [v["gate.decision"] for v in listed] == ["promoted", "rejected", "promoted"]
    assert all(v["run_id"] and v["created"] > 0 for v in listed)

    # re-running the gate on the champion is a no-op; a lower-is-better gate compares the other way
    assert tracking.promote(name, v3, m3, GATE, 0.05).reason == "already champion"
    d_fid = tracking.promote(name, v2, {"overall/fid": 9.5}, "overall/fid", 1.0, greater_is_better=False)
    assert not d_fid.promoted and d_fid.champion_value == 10.0
    assert tracking.champion(name)[0] == "3"

    # load the champion in a fresh interpreter that knows only the tracking URI (no project on the path)
    code = (
        "import json, mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model('models:/{name}@champion')\n"
        "out = m.predict(pd.DataFrame({'prompt': ['a red circle'], 'num_images': [2], "
        "'num_inference_steps': [2]}))\n"
        "import pogdiff\n"
        "print(json.dumps({'shape': list(out.shape), 'dtype': str(out.dtype), 'pogdiff': pogdiff.__file__}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHONPATH"))}
    env["MLFLOW_TRACKING_URI"] = store["uri"]
    env["OMP_NUM_THREADS"] = "1"  # see one_torch_thread
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == [2, 16, 16, 3] and result["dtype"] == "uint8"
    # pogdiff came from the code logged with the model
    assert Path(result["pogdiff"]).parent.parent.name == "code"


def test_predict_rows_are_independent_and_in_order(model_dir):
    from storage.mlflow_model import PixelDiffusionModel

    model = PixelDiffusionModel()
    model.load_context(mlflow.pyfunc.PythonModelContext(artifacts={"model": str(model_dir)}, model_config={}))
    both = model.predict(
        None,
        pd.DataFrame(
            {"prompt": ["a red circle", "a blue square"], "num_images": [2, 1], "num_inference_steps": [2, 2], "seed": [1, 2]}
        ),
    )
    second = model.predict(None, pd.DataFrame({"prompt": ["a blue square"], "num_inference_steps": [2], "seed": [2]}))
    assert both.shape == (3, 16, 16, 3) and both.dtype == np.uint8
    np.testing.assert_array_equal(both[2:], second)
    with pytest.raises(ValueError, match="'prompt'"):
        model.predict(None, pd.DataFrame({"text": ["x"]}))

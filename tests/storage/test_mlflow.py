"""storage.mlflow against a real MLflow store: SQLite database and artifacts in a temp folder.

One store serves the whole module (a fresh SQLite store runs MLflow's migrations, several seconds);
each test uses its own experiment and registered-model names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import lancedb
import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from mlflow import MlflowClient
from peft import LoraConfig
from pydantic import BaseModel
from bench.sdfolder import sd_folder

from pogdiff.pipelines.loader import load_pipeline
from pogdiff.pipelines.pixel import PixelDiffusionPipeline, UNetSpec
from pogdiff.trainer import LORA_TARGETS
from storage.config import GateConfig
from storage.mlflow import connection, descriptions, lineage, packaging, registry, runs
from storage.mlflow.pyfunc_model import unet_digest
from storage.settings import Settings, load_settings
from storage.training_set import DataVersion
from tasks.config import RetrainConfig, parse_config
from tasks.register import register_version
from tasks.track import open_run

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
    connection.configure(uri, str(root / "artifacts"))
    return {"uri": uri, "root": str(root)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pogdiff") / "model"
    spec = UNetSpec(image_size=16, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)
    PixelDiffusionPipeline.new(spec, seed=0).save_pretrained(path)
    return path


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_an_experiment_made_elsewhere_gets_the_model_training_kind(store):
    exp = unique("older")
    MlflowClient().create_experiment(exp)
    with runs.run(exp):
        pass
    assert MlflowClient().get_experiment_by_name(exp).tags["mlflow.experimentKind"] == "custom_model_development"


def test_run_finishes_and_fails(store):
    exp = unique("exp")
    with runs.run(exp, run_name="ok", tags={"flow_run": "abc"}) as run_id:
        assert mlflow.active_run().info.run_id == run_id
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "ok" and run.data.tags["flow_run"] == "abc"
    # the experiment's artifacts live under the configured root, never in ./mlruns
    experiment = MlflowClient().get_experiment_by_name(exp)
    assert experiment.artifact_location == (Path(store["root"]) / "artifacts" / exp).as_uri()
    # it opens on its runs in MLflow's UI, not the GenAI view (traces, token usage)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    with pytest.raises(RuntimeError, match="boom"):
        with runs.run(exp) as failed_id:
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
    assert runs.flatten(_Outer()) == {
        "steps": "3",
        "note": "None",
        "pog.lam": "1.0",
        "pog.formats": '["PNG", "JPEG"]',
        "path": "data",
    }
    assert runs.flatten({"train": {"pog": {"lam": 2.0}, "opts": {}}}, prefix="cfg") == {
        "cfg.train.pog.lam": "2.0",
        "cfg.train.opts": "{}",
    }
    flat = runs.flatten(RetrainConfig())
    assert flat["train.pog.lam"] == "0.02"
    assert flat["evaluate.buckets.few_below"] == "20"


def test_log_config_params_in_batches_and_artifact(store, tmp_path):
    cfg = RetrainConfig()
    many = {f"k{i:03d}": i for i in range(250)}  # more params than MLflow takes in one batch
    with runs.run(unique("cfg")) as run_id:
        runs.log_config(cfg)
        runs.log_config({"extra": many})
    run = MlflowClient().get_run(run_id)
    expected = {**runs.flatten(cfg), **runs.flatten({"extra": many})}
    assert run.data.params == expected
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.json", dst_path=str(tmp_path))
    # the second call overwrote the artifact; the first config is fully in params
    assert json.loads(Path(local).read_text()) == {"extra": many}


def test_log_metrics_rejects_nan_and_logs_steps(store):
    with runs.run(unique("metrics")) as run_id:
        runs.log_metrics({"loss": 0.5}, step=1)
        runs.log_metrics({"loss": 0.25}, step=2)
        with pytest.raises(ValueError, match="'few/frechet_pixels16'"):
            runs.log_metrics({"loss": 0.1, "few/frechet_pixels16": float("nan")}, step=3)
        with pytest.raises(ValueError, match="'psi'"):
            runs.log_metrics({"psi": None})  # type: ignore[dict-item]
    with pytest.raises(RuntimeError, match="inside runs.run"):
        runs.log_metrics({"loss": 0.1})  # no active run: never a stray run in the Default experiment
    history = MlflowClient().get_metric_history(run_id, "loss")
    # nothing of the rejected batch was logged
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]


def test_a_description_too_long_for_mlflow_is_cut_at_a_line_end_and_says_so():
    text = "".join(f"line {i:04d}\n" for i in range(1000))  # 10000 characters
    cut = descriptions.fit(text, descriptions.REGISTRY_LIMIT)
    assert len(cut) <= 5000 and cut.endswith("*(cut to MLflow's 5000-character limit)*\n")
    kept = cut.removesuffix(descriptions.CUT_NOTE.format(limit=5000))
    assert text.startswith(kept + "\n") and kept.endswith("line 0494")  # whole lines only, as many as fit
    assert descriptions.fit("short\n", 5000) == "short\n"


def test_lineage_records_name_digest_source(store, tmp_path):
    long_digest = "f" * 64  # a full sha256; MLflow keeps 36 characters
    lance_uri = "lancedb:///data/lancedb?table=captions&version=7"
    with runs.run(unique("lineage")) as run_id:
        lineage.log_lineage("captions@v3", str(tmp_path / "dataset"), "ab12cd34", "training", 120)
        lineage.log_lineage("eval-captions", lance_uri, long_digest, "evaluation", 8)
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
    sig = packaging.model_signature(16)
    assert [(c.name, c.type.name, c.required) for c in sig.inputs.inputs] == [
        ("prompt", "string", True),
        ("seed", "long", False),
        ("num_images", "long", False),
        ("guidance_scale", "double", False),
        ("num_inference_steps", "long", False),
    ]


@pytest.fixture(scope="module")
def registered(store, model_dir) -> tuple[str, list[tuple[str, dict[str, float], str]]]:
    """Two versions of one registered model, each from its own run with its metrics logged.
    (Logging a model runs MLflow's input-example check, a real generation, so this is done once.)"""
    name = unique("model")
    out = []
    for value in (0.5, 0.7):
        with runs.run(unique("reg")) as run_id:
            metrics = {GATE: value, "overall/frechet_pixels16": 10.0}
            runs.log_metrics(metrics)
            out.append((packaging.log_model(model_dir, name, ["a red circle"]), metrics, run_id))
    return name, out


def test_log_model_registers_increasing_versions(registered, model_dir):
    name, logged = registered
    assert [v for v, _, _ in logged] == ["1", "2"]
    client = MlflowClient()
    for version, _, run_id in logged:
        mv = client.get_model_version(name, version)
        assert mv.run_id == run_id and mv.tags["weights"] == "full"
    info = mlflow.models.get_model_info(f"models:/{name}/2")
    assert [c.name for c in info.signature.inputs.inputs][0] == "prompt"
    (output,) = info.signature.outputs.inputs
    assert output.type == np.dtype(np.uint8) and tuple(output.shape) == (-1, 16, 16, 3)
    assert info.saved_input_example_info is not None
    assert info.flavors["python_function"]["config"] == {"weights": "full"}
    with pytest.raises(RuntimeError, match="inside runs.run"):
        packaging.log_model(model_dir, name, ["a red circle"])
    with pytest.raises(FileNotFoundError, match="pogdiff.json"):
        packaging.log_model(model_dir.parent, name, ["a red circle"])


# ------------------------------------------------------------------------------ LoRA runs


def lora_run(run_dir: Path, base: str, seed: int) -> Path:
    """A LoRA run's outputs laid out as pogdiff.trainer writes them: ``lora/`` (the adapter, saved
    with ``save_lora_adapter``) beside ``model/`` (the adapter fused into the base). The adapter's
    up-projections are random, as after training (peft starts them at zero: no change)."""
    pipe = load_pipeline(base)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in pipe.unet.named_parameters():
            if "lora_B" in pname:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    pipe.unet.save_lora_adapter(run_dir / "lora")
    pipe.unet.fuse_lora()
    pipe.unet.unload_lora()
    pipe.save_pretrained(run_dir / "model", extra={"method": "pogdiff", "steps": 1})
    return run_dir / "model"


@pytest.fixture(scope="module")
def settings(store, tmp_path_factory) -> Settings:
    """Settings on the module's MLflow store and a real LanceDB folder with the two tables the
    pipeline writes (minimal columns: what register and open-run read)."""
    home = tmp_path_factory.mktemp("home")
    lance = home / "lancedb"
    db = lancedb.connect(str(lance))
    db.create_table("captions", pa.table({"caption": ["a blue square", "a red circle"], "count": [2, 5]}))
    features = db.create_table("image_features", pa.table({"image_id": ["a"], "feature": [[0.1, 0.2]]}))
    features.add(pa.table({"image_id": ["b"], "feature": [[0.3, 0.4]]}))  # version 2
    return load_settings(
        home=home,
        mlflow_tracking_uri=store["uri"],
        mlflow_artifact_root=str(Path(store["root"]) / "artifacts"),
        lancedb_uri=str(lance),
    )


def register_lora(settings: Settings, name: str, base: str, seed: int) -> tuple[str, str, Path]:
    """A LoRA run registered the way the register task does it; returns (version, run id, fused model)."""
    config = parse_config({"train": {"base_model": base, "lora_rank": 2}, "registry": {"model_name": name}})
    run_id = runs.start(unique("lora"))
    with runs.resume(run_id):
        runs.log_config(config)
    model = lora_run(Path(settings.runs_dir) / run_id, base, seed)
    return register_version(settings, config.registry, str(model), run_id), run_id, model


PROMPTS = pd.DataFrame({"prompt": ["a red circle", "a blue square"], "num_inference_steps": [2, 2], "seed": [3, 4]})


def fused_images(model: Path) -> np.ndarray:
    """What the trainer's fused model folder generates for PROMPTS (row by row, as the pyfunc does)."""
    pipe = load_pipeline(str(model))
    return np.concatenate([pipe.generate([p], seed=s, num_inference_steps=2, guidance_scale=1.0)
                           for p, s in zip(PROMPTS["prompt"], PROMPTS["seed"])])


def test_lora_run_logs_only_the_adapter_with_its_base(settings, tmp_path, tiny_spec):
    base = tmp_path / "base"
    PixelDiffusionPipeline.new(tiny_spec, seed=0).save_pretrained(base)
    name = unique("lora")
    version, run_id, model = register_lora(settings, name, str(base), seed=1)

    info = mlflow.models.get_model_info(f"models:/{name}/{version}")
    assert info.flavors["python_function"]["config"] == {
        "weights": "lora", "base_model": str(base.resolve()), "base_model_digest": unet_digest(base)}
    assert "peft==0.21.2" in Path(mlflow.pyfunc.get_model_dependencies(f"models:/{name}/{version}")).read_text()
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp_path / "dl")))
    assert [p.name for p in (local / "artifacts").iterdir()] == ["model"]  # a folder base is not copied
    weights = local / "artifacts" / "model"
    assert sorted(p.name for p in weights.iterdir()) == ["lora", "pogdiff.json", "scheduler"]  # no UNet
    adapter = (weights / "lora" / "pytorch_lora_weights.safetensors").stat().st_size
    assert adapter < (model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size / 4
    assert MlflowClient().get_model_version(name, version).tags["base_model"] == str(base.resolve())

    # base + adapter generates exactly what the fused model does, and not what the base does
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    images = loaded.predict(PROMPTS)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, fused_images(model))
    assert not np.array_equal(images, fused_images(base))

    # a retry of the register task reuses the run's version instead of adding one
    config = parse_config({"registry": {"model_name": name}})
    assert register_version(settings, config.registry, str(model), run_id) == version
    assert [v["version"] for v in registry.list_versions(name)] == [version]

    # the adapter refuses a base that changed under its reference
    PixelDiffusionPipeline.new(tiny_spec, seed=7).save_pretrained(base)
    with pytest.raises(ValueError, match="has changed since the adapter was trained"):
        mlflow.pyfunc.load_model(f"models:/{name}/{version}")


def test_stable_diffusion_models_full_and_lora(settings, tmp_path):
    """A Stable Diffusion run logs and loads like a pixel one: the full fused folder, and the LoRA
    adapter on the base folder (latent space, its own VAE, CLIP encoder and scheduler class)."""
    base = sd_folder(tmp_path)
    name = unique("sd-lora")
    version, _, fused = register_lora(settings, name, str(base), seed=5)
    config = mlflow.models.get_model_info(f"models:/{name}/{version}").flavors["python_function"]["config"]
    assert (config["weights"], config["base_model"]) == ("lora", str(base.resolve()))
    expected = fused_images(fused)
    assert expected.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict(PROMPTS), expected)

    full = unique("sd-full")
    with runs.run(unique("sd")):
        full_version = packaging.log_model(fused, full, ["a red circle"])
    np.testing.assert_array_equal(mlflow.pyfunc.load_model(f"models:/{full}/{full_version}").predict(PROMPTS), expected)


def test_log_model_needs_adapter_and_base_together(store, model_dir):
    with runs.run(unique("pair")):
        with pytest.raises(ValueError, match="adapter_dir and base_model together"):
            packaging.log_model(model_dir, unique("m"), ["a red circle"], base_model="builtin:logos16")


@pytest.mark.slow
def test_champions_load_in_a_fresh_process(store, registered, settings, tmp_path):
    """Both kinds of registered model load by alias, one after the other, in an interpreter that
    knows only the tracking URI (no project on the path) and generate for two prompts: a full model,
    and a LoRA model on the builtin base, which travels with it as the artifact "base"."""
    gate = GateConfig()
    name, [(v1, m1, _), _] = registered
    assert registry.promote(name, v1, m1, gate).promoted
    lora_name = unique("lora-builtin")
    version, _, lora_model = register_lora(settings, lora_name, "builtin:logos16", seed=2)
    assert registry.promote(lora_name, version, {GATE: 0.5}, gate).promoted  # no champion yet
    artifacts = mlflow.models.get_model_info(f"models:/{lora_name}/{version}").flavors["python_function"]["artifacts"]
    assert sorted(artifacts) == ["base", "model"]
    expected = tmp_path / "expected.npy"
    np.save(expected, fused_images(lora_model))

    code = (
        "import json, mlflow, numpy as np, pandas as pd\n"
        f"prompts = pd.DataFrame({PROMPTS.to_dict(orient='list')!r})\n"
        f"full = mlflow.pyfunc.load_model('models:/{name}@champion').predict(prompts)\n"
        f"lora = mlflow.pyfunc.load_model('models:/{lora_name}@champion').predict(prompts)\n"
        "import pogdiff\n"
        "print(json.dumps({'full': list(full.shape), 'lora': list(lora.shape), 'dtype': str(lora.dtype),\n"
        f"    'same': bool(np.array_equal(lora, np.load({str(expected)!r}))), 'pogdiff': pogdiff.__file__}}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHONPATH"))}
    env["MLFLOW_TRACKING_URI"] = store["uri"]
    env["OMP_NUM_THREADS"] = "1"  # see one_torch_thread
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["full"] == [2, 16, 16, 3] and result["lora"] == [2, 16, 16, 3] and result["dtype"] == "uint8"
    assert result["same"], "the LoRA model loaded elsewhere generates what the fused model does"
    # pogdiff came from the code logged with the model
    assert Path(result["pogdiff"]).parent.parent.name == "code"


def test_predict_rows_are_independent_and_in_order(model_dir):
    from storage.mlflow.pyfunc_model import TextToImageModel

    model = TextToImageModel()
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


# ------------------------------------------------------------------------------ run tags and system metrics


def test_open_run_records_lineage_and_tags(settings):
    config = RetrainConfig()
    run_id = open_run.fn(settings, config, DataVersion(snapshot_id="snap1234", rows=7, captions_version=1, features_version=2))
    runs.end(run_id)
    run = MlflowClient().get_run(run_id)
    tags = run.data.tags
    assert tags["dataset_snapshot_id"] == "snap1234" and tags["prefect_flow_run_id"] == "none"
    assert tags["lancedb_captions_version"] == "1" and tags["lancedb_image_features_version"] == "2"
    assert tags["base_model"] == "builtin:logos16" and tags["method"] == "pogdiff"
    assert tags["mlflow.source.name"] == "flows/retrain.py:retrain" and tags["mlflow.source.type"] == "JOB"
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["mlflow.user"]
    assert "prefect_flow_run_url" not in tags  # outside a flow run there is no flow run to link
    # the description says what the run trains on before anything is registered
    assert "dataset snapshot `snap1234` (7 rows), outside Prefect" in tags["mlflow.note.content"]
    assert run.data.params["registry.gate.metric"] == GATE

    inputs = {}
    for d in run.inputs.dataset_inputs:
        context = {t.key: t.value for t in d.tags}["mlflow.data.context"]
        inputs[d.dataset.name] = (context, json.loads(d.dataset.source)["uri"], json.loads(d.dataset.profile)["num_rows"])
    lance = Path(settings.lancedb_uri)
    assert inputs == {
        "dataset@snap1234": ("training", str(settings.dataset_uri), 7),
        "lancedb/captions@v1": ("training", str(lance / "captions.lance"), 2),
        "lancedb/image_features@v2": ("training", str(lance / "image_features.lance"), 2),
        "eval-captions@lancedb-v1": ("evaluation", str(lance / "captions.lance"), 2),
        "eval-references@snap1234": ("evaluation", str(settings.dataset_uri), 7),
    }


def test_system_metrics_are_sampled_when_psutil_is_there(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    assert connection.system_metrics_enabled()
    run_id = runs.start(unique("sys"))
    with runs.resume(run_id):
        time.sleep(2)  # a block long enough for the monitor's samples (interval 0.1 s)
    runs.end(run_id)
    assert any(k.startswith("system/cpu_utilization") for k in MlflowClient().get_run(run_id).data.metrics)

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    assert not connection.system_metrics_enabled()
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    monkeypatch.setitem(sys.modules, "psutil", None)  # as if psutil were not installed
    assert not connection.system_metrics_enabled()
    with runs.run(unique("nosys")) as run_id:
        runs.log_metrics({"loss": 1.0})
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_an_artifact_root_with_credentials_is_refused_without_echoing_them(tmp_path):
    for root in ("s3://AKIA:s3cr3t@bucket/mlflow", "https://bucket.example/mlflow?sig=s3cr3t"):
        with pytest.raises(ValueError, match="carries credentials") as err:
            connection.configure(f"sqlite:///{tmp_path / 'mlflow.db'}", root)
        assert "s3cr3t" not in str(err.value)
    connection.configure(f"sqlite:///{tmp_path / 'mlflow.db'}", "s3://bucket/mlflow")  # no credentials: accepted


def test_use_configures_a_process_once_and_again_when_something_moved_it(tmp_path, monkeypatch):
    """A flow's tasks each call ``use``: the first points the process at the store, the rest find it
    there; a process moved elsewhere meanwhile, or one that lost the credentials, is pointed back."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")  # so what ``use`` writes there is undone after the test
    calls = []
    real = connection.configure
    monkeypatch.setattr(connection, "configure", lambda *a: (calls.append(a), real(*a)))
    a = Settings(home=tmp_path / "a", mlflow_tracking_uri=f"sqlite:///{tmp_path / 'a.db'}")
    b = Settings(home=tmp_path / "b", mlflow_tracking_uri=f"sqlite:///{tmp_path / 'b.db'}")
    connection.use(a)
    connection.use(a)
    assert len(calls) == 1 and mlflow.get_tracking_uri() == mlflow.get_registry_uri() == a.mlflow_tracking_uri
    connection.use(b)
    assert len(calls) == 2 and mlflow.get_registry_uri() == b.mlflow_tracking_uri
    mlflow.set_registry_uri(a.mlflow_tracking_uri)  # another library call moved the registry
    connection.use(b)
    assert len(calls) == 3 and mlflow.get_registry_uri() == b.mlflow_tracking_uri

    server = Settings(home=tmp_path / "c", mlflow_tracking_uri="http://alice:pw@127.0.0.1:9")
    connection.use(server)
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and mlflow.get_tracking_uri() == "http://127.0.0.1:9"
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    connection.use(server)  # the credentials left the environment: put them back
    assert len(calls) == 5 and os.environ["MLFLOW_TRACKING_PASSWORD"] == "pw"

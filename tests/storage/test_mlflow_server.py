"""The lifecycle against a real `mlflow server` over HTTP: SQLite backend and proxied artifacts in a
temp folder, on a free loopback port. The server is the .venv's own `mlflow` executable."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from browser import dump_dom, missing
from localserver import free_port, healthy, start_mlflow_server, stop_server, wait_for
from mlflow import MlflowClient

from pogdiff.atomic import write_atomic
from pogdiff.grids import comparison_grid
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from storage.config import GateConfig
from storage.mlflow import connection, lineage, packaging, registry, runs

pytestmark = pytest.mark.slow  # servers, processes or whole flows: see pyproject's marker

STARTUP_LIMIT_S = 240  # a fresh SQLite store runs MLflow's migrations first; slow on a busy machine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_mlflow_server(root, port)
    try:
        wait_for(lambda: healthy(url), STARTUP_LIMIT_S, "the mlflow server", [proc], interval=0.5, log=root / "server.log")
        yield {"url": url, "root": root}
    finally:
        stop_server(proc)


def test_register_promote_and_load_over_http(server, tmp_path, tiny_spec):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # MLflow's input-example check generates; one thread is fastest here
    try:
        # a local artifact root is ignored against a server: its own store keeps the artifacts
        connection.configure(server["url"], str(tmp_path / "local-artifacts"))
        model_dir = tmp_path / "model"
        PixelDiffusionPipeline.new(tiny_spec, seed=0).save_pretrained(model_dir)
        name = f"served-{uuid.uuid4().hex[:6]}"
        experiment = f"http-{uuid.uuid4().hex[:6]}"
        with runs.run(experiment) as run_id:
            runs.log_metrics({"few/grecall": 0.5, "overall/frechet_pixels16": 12.0})
            lineage.log_lineage("dataset@abc", str(tmp_path / "dataset"), "abc", "training", 3)
            version = packaging.log_model(model_dir, name, ["a red circle"])
        decision = registry.promote(name, version, {"few/grecall": 0.5, "overall/frechet_pixels16": 12.0}, GateConfig())
    finally:
        torch.set_num_threads(before)
    assert decision.promoted and decision.reason == "no champion yet"

    client = MlflowClient()
    assert client.get_experiment_by_name(experiment).artifact_location.startswith("mlflow-artifacts:")
    assert not (tmp_path / "local-artifacts").exists()
    assert [d.dataset.name for d in client.get_run(run_id).inputs.dataset_inputs] == ["dataset@abc"]
    assert [(v["version"], v["aliases"]) for v in registry.list_versions(name)] == [("1", ["challenger", "champion"])]
    # the weights went through the server's proxy into its artifacts destination
    stored = list((server["root"] / "artifacts").rglob("diffusion_pytorch_model.safetensors"))
    assert len(stored) == 1

    # loaded over HTTP by alias in a fresh interpreter that only knows the server's address
    code = (
        "import json, mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model('models:/{name}@champion')\n"
        "out = m.predict(pd.DataFrame({'prompt': ['a red circle', 'a blue square'], 'num_inference_steps': [2, 2]}))\n"
        "print(json.dumps({'shape': list(out.shape), 'dtype': str(out.dtype)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHONPATH"))}
    env.update({"MLFLOW_TRACKING_URI": server["url"], "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"shape": [2, 16, 16, 3], "dtype": "uint8"}

    # and in this process, the same images as the model folder itself
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    prompts = pd.DataFrame({"prompt": ["a red circle"], "num_inference_steps": [2], "seed": [5]})
    expected = PixelDiffusionPipeline.from_pretrained(str(model_dir)).generate(["a red circle"], seed=5, num_inference_steps=2, guidance_scale=1.0)
    np.testing.assert_array_equal(loaded.predict(prompts), expected)


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
def test_the_experiment_opens_on_its_runs_and_the_version_on_its_bucket_table(server, tmp_path):
    """The pages a reviewer opens from our links, in the real UI: the experiment on its runs table
    (the model-training view, not the GenAI one of traces), the version with its description's table
    of metric rows by bucket columns."""
    from storage.mlflow import descriptions, ui
    from tasks.report import bucket_table

    connection.configure(server["url"])
    name = f"browser-{uuid.uuid4().hex[:6]}"
    with runs.run(name) as run_id:
        runs.log_metrics({"few/grecall": 0.5, "many/grecall": 0.7})
    client = MlflowClient()
    client.create_registered_model(name)
    client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
    table = bucket_table({"few/grecall": 0.5, "many/grecall": 0.7}, {"few/grecall": 0.4}, "champion v0")
    descriptions.describe_version(name, "1", "\n".join([f"### {name} version 1", "", *table]))

    experiment = dump_dom(ui.experiment_link(server["url"], client.get_run(run_id).info.experiment_id))
    assert 'data-testid="sort-header-Run Name">Run Name<' in experiment and ">Created<" in experiment, experiment[-3000:]
    selected = re.findall(r'<a [^>]*aria-current="page"[^>]*>(?:<span[^>]*>.*?</span>)?([^<]+)</a>', experiment)
    assert selected == ["Runs"], selected  # the side navigation's open page: the runs, not Traces or an Overview of traces
    version = dump_dom(ui.version_link(server["url"], name, "1"))
    assert all(f"<th>{h}</th>" in version for h in ("metric", "many", "few")), version[-3000:]
    assert "<td>grecall ↑</td>" in version and "<td>0.500 (+0.100)</td>" in version


def test_a_reviewer_sees_the_description_and_the_grid_in_the_browser(server, tmp_path):
    """The MLflow UI itself (a React app, served by the real server) in headless Chromium: the run
    page renders the run's markdown description, the artifact page shows the grid picture."""
    from PIL import Image

    connection.configure(server["url"])
    experiment = f"browser-{uuid.uuid4().hex[:6]}"
    swatch = lambda rgb: np.broadcast_to(np.array(rgb, np.uint8), (2, 16, 16, 3)).copy()  # noqa: E731
    grid = comparison_grid(["Vexo\n3 training\nimages"], [swatch((200, 0, 0))], [swatch((0, 0, 200))],
                           [["a small Vexo logo", "the Vexo logo, large"]], "few bucket: 1 individual with fewer than 10 training images")
    (tmp_path / "eval").mkdir()
    write_atomic(tmp_path / "eval" / "grid_few.png", lambda f: Image.fromarray(grid).save(f, format="PNG"))
    with runs.run(experiment) as run_id:
        # MLflow's description field; the retrain writes its own (the version table, the decision)
        runs.set_tags(run_id, {"mlflow.note.content": "Retrain of browser-model v1: **promoted** because there was no champion."})
        runs.log_metrics({"few/grecall": 0.5})
        runs.log_artifacts(tmp_path / "eval", "eval")
    page = f"{server['url']}/#/experiments/{MlflowClient().get_run(run_id).info.experiment_id}/runs/{run_id}"

    overview = dump_dom(page)
    assert "Retrain of browser-model v1: <strong>promoted</strong> because there was no champion." in overview
    artifact = dump_dom(f"{page}/artifacts/eval/grid_few.png")
    # the artifact tree names the file and the preview is an image the UI fetched from the server
    assert 'artifact-name="grid_few.png"' in artifact
    assert re.search(r'<img alt="eval/grid_few.png" src="blob:', artifact), artifact[-3000:]

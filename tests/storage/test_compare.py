"""``pogdiff compare``: references resolved in a real SQLite MLflow store, the table and its deltas."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from clirunner import run_cli
from mlflow.tracking import MlflowClient
from PIL import Image

from pogdiff.compare_page import comparison_rows
from storage.errors import RunNotFound
from storage.mlflow.references import resolve_run

MODEL = "cmp-model"
OLD = {"many/grecall": 0.8, "few/grecall": 0.2, "overall/grecall": 0.5, "few/frechet_pixels16": 40.0, "overall/frechet_pixels16": 30.0, "train/loss": 0.3}
NEW = {"many/grecall": 0.8, "few/grecall": 0.5, "overall/grecall": 0.6, "overall/frechet_pixels16": 25.0, "few/accuracy": 0.9}
GRIDS_OLD = {"many": (200, 0, 0), "few": (0, 200, 0)}  # each run's eval/grid_<bucket>.png, one colour each
GRIDS_NEW = {"few": (0, 0, 200)}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """Two evaluated runs, registered as versions 1 (champion) and 2 (challenger) of one model."""
    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("compare", artifact_location=(root / "artifacts").as_uri())
    runs = []
    for metrics, grids in ((OLD, GRIDS_OLD), (NEW, GRIDS_NEW)):
        run_id = client.create_run(exp).info.run_id
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        folder = root / run_id
        folder.mkdir()
        for bucket, rgb in grids.items():
            Image.new("RGB", (4, 2), rgb).save(folder / f"grid_{bucket}.png")
        client.log_artifacts(run_id, str(folder), "eval")
        runs.append(run_id)
    # a later value of a metric replaces the earlier one: compare reads the latest
    client.log_metric(runs[1], "many/grecall", 0.7, step=1)
    client.create_registered_model(MODEL)
    for run_id in runs:
        client.create_model_version(MODEL, source=(root / "artifacts").as_uri(), run_id=run_id)
    client.create_model_version(MODEL, source=(root / "artifacts").as_uri())  # v3: not logged from a run
    client.set_registered_model_alias(MODEL, "champion", "1")
    client.set_registered_model_alias(MODEL, "challenger", "2")
    return {"uri": uri, "root": root, "runs": runs}


def test_references_resolve_to_runs_and_latest_metrics(store):
    uri, (old, new) = store["uri"], store["runs"]
    by_id = resolve_run(uri, old, MODEL)
    assert (by_id.run_id, by_id.model, by_id.version) == (old, None, None)
    assert by_id.metrics == OLD
    for ref in ("champion", f"{MODEL}@champion", f"models:/{MODEL}@champion", f"{MODEL}/1", f"models:/{MODEL}/1"):
        r = resolve_run(uri, ref, MODEL)
        assert (r.run_id, r.model, r.version, r.ref) == (old, MODEL, "1", ref)
    challenger = resolve_run(uri, "challenger", MODEL)
    assert challenger.run_id == new and challenger.metrics["many/grecall"] == 0.7


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("retired", f"^cannot resolve 'retired': registered model '{MODEL}' has no alias 'retired'$"),
        ("no-such@champion", "^cannot resolve 'no-such@champion': no registered model named 'no-such'$"),
        (f"{MODEL}/9", f"^cannot resolve '{MODEL}/9': registered model '{MODEL}' has no version '9'$"),
        ("9", f"^cannot resolve '9': registered model '{MODEL}' has no version '9'$"),
        (f"{MODEL}/latest", "must be a number"),
        (f"{MODEL}/3", "version 3, which was not logged from a run"),
        ("0" * 32, "Run with id=0{32} not found"),
        ("  ", "empty reference"),
    ],
)
def test_unknown_references_are_named(store, ref, message):
    with pytest.raises(RunNotFound, match=message):
        resolve_run(store["uri"], ref, MODEL)


@pytest.fixture
def pogdiff(capfd):
    return lambda *args, store: run_cli(list(args), capfd, POGDIFF_HOME=str(store["root"] / "home"),
                                        POGDIFF_MLFLOW_TRACKING_URI=store["uri"])


def test_compare_command_prints_table_and_json(pogdiff, store):
    old, new = store["runs"]
    out = pogdiff("compare", "champion", f"{MODEL}/2", "--model", MODEL, "--json", store=store)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["a"] == {"ref": "champion", "run_id": old, "model": MODEL, "version": "1"}
    assert data["b"]["run_id"] == new
    assert data["rows"] == json.loads(json.dumps(comparison_rows(OLD, {**NEW, "many/grecall": 0.7})))

    text = pogdiff("compare", old, "challenger", "--model", MODEL, store=store)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"A: {old} = run {old}"
    assert lines[1] == f"B: challenger = {MODEL} v2 (run {new})"
    few_grecall = next(line for line in lines if line.split()[:2] == ["few", "grecall"])
    assert few_grecall.split() == ["few", "grecall", "0.2000", "0.5000", "+0.3000", "B"]
    overall_frechet = next(line for line in lines if line.split()[:2] == ["overall", "frechet_pixels16"])
    assert overall_frechet.split() == ["overall", "frechet_pixels16", "30.0000", "25.0000", "-5.0000", "B"]
    assert "(lower is better: frechet_pixels16; every other metric: higher is better)" in text.stdout

    bad = pogdiff("compare", "champion", "retired", "--model", MODEL, store=store)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: cannot resolve 'retired': registered model '{MODEL}' has no alias 'retired'"]


def test_compare_html_is_one_page_with_both_grids_inline(pogdiff, store, tmp_path):
    old, new = store["runs"]
    out = tmp_path / "review" / "v1-v2.html"
    result = pogdiff("compare", "champion", "challenger", "--model", MODEL, "--html", str(out), store=store)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout and f"B: challenger = {MODEL} v2 (run {new})" in result.stdout
    page = out.read_text()
    assert f"{MODEL} v1 (A) against {MODEL} v2 (B)" in page and f"run {old}" in page
    # the pictures are the runs' own grids, inlined: many (A only, B says it has none), then few, A beside B
    images = re.findall(r'<img alt="([AB]): (grid_\w+\.png)" src="data:image/png;base64,([^"]+)"', page)
    colours = [(side, name, Image.open(io.BytesIO(base64.b64decode(data))).getpixel((0, 0))) for side, name, data in images]
    assert colours == [("A", "grid_many.png", GRIDS_OLD["many"]), ("A", "grid_few.png", GRIDS_OLD["few"]),
                       ("B", "grid_few.png", GRIDS_NEW["few"])]
    assert "no grid_many.png in this run" in page
    assert re.search(r"<td>overall</td><td>frechet_pixels16</td><td>lower</td><td class=num>30.0000</td><td class=num>25.0000</td>"
                     r"<td class='num good'>-5.0000</td><td>B</td>", page)
    assert not re.search(r'(src|href)="https?:', page)  # no MLflow UI address is set: nothing external at all

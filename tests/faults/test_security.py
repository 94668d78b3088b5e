"""Security: no unpickling of data, no LanceDB filter built from a raw string, paths confined to
their roots, and credentials in URIs never reach logs, MLflow or Prefect."""

from __future__ import annotations

import ast
import base64
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import lancedb
import pyarrow as pa
import pytest
from clirunner import run_cli
from faultkit import EXPERIMENT, ROOT, cli_env, flow_run_id, record, start_cli
from localserver import free_port, healthy, start_mlflow_server, stop_server, wait_for
from mlflow.tracking import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.settings import PREFECT_API_URL, temporary_settings

from storage import vectors
from storage.mlflow import connection
from storage.settings import load_settings
from tasks.train import run_dir

PACKAGES = ("pogdiff", "storage", "tasks", "flows", "bench", "run.py")


def _sources() -> list[Path]:
    out = []
    for name in PACKAGES:
        path = ROOT / name
        out += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return out


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _is_true(call: ast.Call, keyword: str) -> bool:
    return any(k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it was imported as: ``import pickle as p`` gives p -> pickle,
    ``from pickle import loads as l`` gives l -> pickle.loads."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _resolved(node: ast.AST, aliases: dict[str, str]) -> str:
    name = _name(node)
    head, _, rest = name.partition(".")
    full = aliases.get(head, head)
    return f"{full}.{rest}" if rest else full


_PICKLERS = ("pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal")
_SAFE_YAML_LOADERS = ("SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader")


def unsafe_loads(tree: ast.AST) -> list[str]:
    """Calls and imports that can execute code hidden in a file or a string, imported names resolved
    through their aliases: pickle-family loading (pickle, cloudpickle, dill, joblib, shelve, marshal),
    ``torch.load`` without ``weights_only=True``, ``numpy.load(allow_pickle=True)``,
    ``pandas.read_pickle``, ``yaml.unsafe_load`` / ``full_load`` / ``load`` without a safe Loader,
    ``trust_remote_code=True`` and ``shell=True`` in any call."""
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: import {n}" for n in names if n.split(".")[0] in ("cloudpickle", "dill", "joblib")]
        if not isinstance(node, ast.Call):
            continue
        name = _resolved(node.func, aliases)
        root, last = name.split(".")[0], name.split(".")[-1]
        if root in _PICKLERS and last in ("load", "loads", "Unpickler", "open"):
            found.append(f"line {node.lineno}: {name}")
        elif name == "torch.load" and not _is_true(node, "weights_only"):
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        elif name == "numpy.load" and _is_true(node, "allow_pickle"):
            found.append(f"line {node.lineno}: numpy.load(allow_pickle=True)")
        elif name == "pandas.read_pickle" or (last == "read_pickle" and root not in aliases):
            found.append(f"line {node.lineno}: {name}")
        elif root == "yaml" and last in ("unsafe_load", "unsafe_load_all", "full_load", "full_load_all"):
            found.append(f"line {node.lineno}: {name}")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = next((k.value for k in node.keywords if k.arg == "Loader"), node.args[1] if len(node.args) > 1 else None)
            if loader is None or _name(loader).split(".")[-1] not in _SAFE_YAML_LOADERS:
                found.append(f"line {node.lineno}: {name} without a safe Loader")
        for keyword in ("trust_remote_code", "shell"):
            if _is_true(node, keyword):
                found.append(f"line {node.lineno}: {name}({keyword}=True)")
    return found


_PLANTED = {
    "import pickle as p\np.loads(b)\n": "pickle.loads",
    "from pickle import loads\nloads(b)\n": "pickle.loads",
    "from pickle import loads as l\nl(b)\n": "pickle.loads",
    "import cloudpickle\n": "import cloudpickle",
    "import dill as d\n": "import dill",
    "import joblib\njoblib.load(p)\n": "joblib.load",
    "import torch\ntorch.load(p)\n": "torch.load without weights_only",
    "import torch as t\nt.load(p, weights_only=False)\n": "torch.load without weights_only",
    "from torch import load\nload(p)\n": "torch.load without weights_only",
    "import numpy as np\nnp.load(p, allow_pickle=True)\n": "numpy.load(allow_pickle=True)",
    "import pandas as pd\npd.read_pickle(p)\n": "pandas.read_pickle",
    "from pandas import read_pickle\nread_pickle(p)\n": "pandas.read_pickle",
    "import yaml\nyaml.unsafe_load(s)\n": "yaml.unsafe_load",
    "import yaml\nyaml.load(s)\n": "yaml.load without a safe Loader",
    "import yaml\nyaml.load(s, Loader=yaml.Loader)\n": "yaml.load without a safe Loader",
    "import yaml as y\ny.full_load(s)\n": "yaml.full_load",
    "from transformers import AutoModel\nAutoModel.from_pretrained(m, trust_remote_code=True)\n": "trust_remote_code=True",
    "import subprocess as sp\nsp.run(cmd, shell=True)\n": "subprocess.run(shell=True)",
    "import shelve\nshelve.open(p)\n": "shelve.open",
}
_SAFE = ("import torch\ntorch.load(p, weights_only=True)\n", "import numpy as np\nnp.load(p)\n",
         "import yaml\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\n", "import subprocess\nsubprocess.run(['ls'])\n",
         "import json\njson.loads(s)\n")


@pytest.mark.parametrize("code", list(_PLANTED))
def test_the_scan_finds_each_unsafe_load_planted_in_a_file(code, tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(code)
    found = unsafe_loads(ast.parse(planted.read_text()))
    assert len(found) >= 1 and any(_PLANTED[code] in f for f in found), found


@pytest.mark.parametrize("code", _SAFE)
def test_the_scan_passes_safe_loads(code):
    assert unsafe_loads(ast.parse(code)) == []


def test_no_code_loads_pickled_data():
    found = {str(p.relative_to(ROOT)): hits for p in _sources() if (hits := unsafe_loads(ast.parse(p.read_text())))}
    assert found == {}
    record("unsafe loaders in the sources (AST scan, aliases resolved: pickle family, torch.load without weights_only, "
           "read_pickle, yaml unsafe loaders, trust_remote_code=True, shell=True)", "all",
           "none: weights are safetensors, optimizer state `torch.load(weights_only=True)`, the MLflow model logged from code")


def _filters(tree: ast.AST) -> list[tuple[int, ast.AST, ast.FunctionDef | None]]:
    """Every ``.where(expr)``, ``.delete(expr)`` and ``filter=expr`` with its enclosing function."""
    out = []
    for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        for node in ast.walk(fn):
            if isinstance(node, ast.Call):
                if (isinstance(node.func, ast.Attribute) and node.func.attr in ("where", "delete") and node.args
                        and _name(node.func.value) not in ("np", "numpy", "pc", "torch")):  # array where(), not SQL
                    out.append((node.lineno, node.args[0], fn))
                out += [(node.lineno, k.value, fn) for k in node.keywords if k.arg in ("filter", "where")]
    return out


# Builders of pyarrow compute Expressions (pc.field comparisons): a filter made of them holds no SQL text.
EXPRESSION_BUILDERS = ("split_filter",)


def _quoted(expr: ast.AST, fn: ast.FunctionDef) -> bool:
    """A constant, a call of ``quote_sql`` or of an ``EXPRESSION_BUILDERS`` function, an f-string of
    those, or a name assigned from one."""
    if isinstance(expr, ast.Constant):
        return True
    if isinstance(expr, ast.JoinedStr):
        return all(_quoted(v.value, fn) for v in expr.values if isinstance(v, ast.FormattedValue))
    if isinstance(expr, ast.Name):
        sources = [a.value for a in ast.walk(fn) if isinstance(a, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == expr.id for t in a.targets)]
        return bool(sources) and all(any(_name(c.func).endswith(("quote_sql", *EXPRESSION_BUILDERS)) for c in ast.walk(s)
                                         if isinstance(c, ast.Call)) for s in sources)
    return isinstance(expr, ast.Call) and _name(expr.func).endswith(("quote_sql", *EXPRESSION_BUILDERS))


def test_lancedb_filters_quote_every_value():
    checked = 0
    for path in (ROOT / "storage").rglob("*.py"):
        for line, expr, fn in _filters(ast.parse(path.read_text())):
            assert _quoted(expr, fn), f"{path.name}:{line}: a LanceDB filter built without vectors.quote_sql"
            checked += 1
    assert checked >= 1  # search_captions filters by id


def test_quote_sql_keeps_a_hostile_value_a_value(tmp_path):
    table = lancedb.connect(str(tmp_path)).create_table("t", pa.table({"caption_id": ["a", "b"], "n": [1, 2]}))
    hostile = "x' OR caption_id != 'x"
    assert table.search().where(f"caption_id = '{hostile}'").to_arrow().num_rows == 2  # pasted: matches all
    assert table.search().where(f"caption_id = {vectors.quote_sql(hostile)}").to_arrow().num_rows == 0
    assert table.search().where(f"caption_id IN ({vectors.quote_sql(hostile)})").to_arrow().num_rows == 0
    assert table.search().where(f"caption_id = {vectors.quote_sql('a')}").to_arrow().num_rows == 1
    record("LanceDB filter with a hostile value (`x' OR caption_id != 'x`)", "index / neighbours",
           "every filter value goes through `vectors.quote_sql`: matches nothing (pasted raw it would match every row)")


@pytest.mark.parametrize("run_id", ["../../etc", "/tmp/x", "a" * 31 + "/", "A" * 32, "..", ""])
def test_run_folders_stay_inside_runs_dir(run_id, tmp_path):
    settings = load_settings(home=tmp_path)
    with pytest.raises(ValueError, match="not an MLflow run id"):
        run_dir(settings, run_id)
    assert run_dir(settings, "0123456789abcdef" * 2).parent == settings.runs_dir
    # ingest-side escapes (`..`, absolute paths, symlinks and tar links out of the source) are
    # quarantined as path_outside_source: tests/storage/test_parquet.py and test_sources.py


SECRET = "s3cret-Pw-of-alice"  # the auth app wants 12 characters or more


@pytest.fixture
def mlflow_server(tmp_path):
    """Port of a real MLflow server behind basic auth (user alice, password SECRET): a request
    without the right credentials gets 401, so every path below must carry them to work at all."""
    port, root = free_port(), tmp_path / "mlflow-server"
    root.mkdir()
    proc = start_mlflow_server(root, port, auth=("alice", SECRET))
    try:
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}"), 240, "the MLflow server", procs=[proc], interval=1,
                 log=root / "server.log")
        yield port
    finally:
        stop_server(proc)


def _status(url: str, user: str | None = None, password: str = "") -> int:
    request = urllib.request.Request(url)
    if user is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_uri_password_never_reaches_logs_mlflow_or_prefect(mlflow_server, prefect_api, tiny, tmp_path, monkeypatch, capfd):
    """A retrain against a server that enforces basic auth, its tracking URI and UI URL carrying
    the password: it works (so the credentials reach every request, the model download included),
    and the password is in none of its output, params, tags, artifacts, registry tags, descriptions,
    Prefect artifacts or Prefect logs; then every other command on the same settings."""
    source, config, _ = tiny
    secret = SECRET
    search = f"http://127.0.0.1:{mlflow_server}/api/2.0/mlflow/experiments/search?max_results=1"
    assert (_status(search), _status(search, "alice", "wrong-password-1"), _status(search, "alice", secret)) == (401, 401, 200)
    tracking_uri = f"http://alice:{secret}@127.0.0.1:{mlflow_server}"
    env = cli_env(tmp_path / "home", prefect_api, POGDIFF_MLFLOW_TRACKING_URI=tracking_uri,
                  POGDIFF_MLFLOW_UI_URL=f"http://bob:{secret}@mlflow.example.org")
    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        rc, out = start_cli(["retrain", str(source), "--config", str(config)], env, tmp_path / "out.log").wait()
        assert rc == 0, out[-4000:]
        flow_run = flow_run_id(out)
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run])))
    assert "***@" in out  # the printed UI hints are redacted, not dropped
    assert secret not in out
    assert any(a.key == "retrain-report" for a in artifacts)
    assert all(secret not in str(a.data) and secret not in str(a.description) for a in artifacts)
    assert logs and all(secret not in log.message for log in logs)

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")  # configure() sets them below; undone after the test
    connection.configure(tracking_uri)  # the client side of the same settings
    mlflow = MlflowClient()
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED"
    assert all(secret not in f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items())
    assert all(secret not in str(d.dataset.source) for d in run.inputs.dataset_inputs)
    with tempfile.TemporaryDirectory() as tmp:
        files = [p for p in Path(mlflow.download_artifacts(run.info.run_id, "", tmp)).rglob("*") if p.is_file()]
        assert files and all(secret.encode() not in p.read_bytes() for p in files)
    model = run.data.params["registry.model_name"]
    for version in mlflow.search_model_versions(f"name = '{model}'"):
        assert all(secret not in f"{k}={v}" for k, v in version.tags.items())
        assert "***@mlflow.example.org" in version.description and secret not in version.description  # its links
    assert secret not in mlflow.get_registered_model(model).description
    assert all(secret not in v for v in mlflow.get_experiment_by_name(EXPERIMENT).tags.values())

    # every other command on the same credentialed settings, its success and its error paths
    commands = [
        ["models", "--config", str(config)],
        ["models", "--model", "no-such-model"],
        ["compare", "champion", "challenger", "--model", model],
        ["compare", "champion", "no-such-run", "--model", model],
        ["promote", "1", "--config", str(config), "--reason", "check"],
        ["promote", "challenger", "--config", str(config), "--reason", "check"],
        ["promote", "99", "--config", str(config)],
        ["evaluate", "champion", "--config", str(config)],
        ["evaluate", "99", "--config", str(config)],
    ]
    for args in commands:  # in process (the retrain above was the subprocess path)
        result = run_cli(args, capfd, **env)
        code, text = result.returncode, result.output
        assert secret not in text, (args, text[-2000:])
        if "99" in args or "no-such-run" in args:
            assert code != 0 and "error:" in text, (args, text[-2000:])
        else:
            assert code == 0, (args, text[-3000:])
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    assert secret not in experiment.artifact_location
    record("password in the MLflow tracking URI and UI URL (`http://alice:<pw>@host`)", "all",
           "run works against a real MLflow server that enforces basic auth (401 without the password); password in none of: stdout/stderr of retrain, models, compare, promote, "
           "evaluate (success and error paths), Prefect logs and artifacts, MLflow params, tags, inputs, artifacts, "
           "version tags and descriptions, model and experiment descriptions, experiment location")

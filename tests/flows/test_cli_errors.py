"""Every mistake a user makes on the command line is one line on stderr, naming what is wrong, exit 2,
no traceback, within a bounded time (an alarm in the test, never a timing assertion).

The table runs real commands in process (``clirunner``) on one fresh home: parser errors, bad
files and folders, bad configs and settings, stores that are missing, unreachable, misconfigured
or lack a driver, and names or versions that do not exist.
"""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from clirunner import run_cli
from localserver import free_port

SECRET = "s3cr3t-pw"
CASE_TIMEOUT_S = 30  # generous for 2 busy cores; a command that hangs on a store is what it catches


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace of the things users point commands at: files, folders, sources, configs, settings."""
    root = tmp_path_factory.mktemp("cli-errors")
    (root / "notes.txt").write_text("not a source\n")
    (root / "folder").mkdir()
    src = root / "src"
    src.mkdir()
    (src / "captions.csv").write_text("image,caption\n")  # a header and no rows
    jsonl = root / "jsonl-src"
    jsonl.mkdir()
    (jsonl / "captions.jsonl").write_text('{"image": "a.png", "caption": "a red star"}\n')
    (root / "unknown-key.yaml").write_text("train:\n  stepz: 3\n")
    (root / "not-yaml.yaml").write_text("train: [unclosed\n")
    (root / "wrong-type.yaml").write_text("train:\n  steps: many\n")
    (root / "list.yaml").write_text("- train\n- index\n")
    (root / "settings-list.yaml").write_text("- home\n")
    (root / "settings-unknown.yaml").write_text("homee: somewhere\n")
    return root


@pytest.fixture(scope="module")
def silent_server():
    """A tracking server that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://admin:{SECRET}@127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


NOT_FOUND = "{ws}/nope"
# (id, argv, env, what the one line must say); {ws} is the workspace, {port} a closed port
CASES = [
    # the parser: commands, numbers in range, choices, files and folders of the right kind
    ("no-command", [], {}, "the following arguments are required: COMMAND"),
    ("unknown-command", ["trian"], {}, "invalid choice: 'trian'"),
    ("base-without-action", ["base"], {}, "the following arguments are required: ACTION"),
    ("neighbours-k-negative", ["neighbours", "a red star", "-k", "-1"], {}, "argument -k: must be at least 1, got -1"),
    ("neighbours-k-zero", ["neighbours", "a red star", "-k", "0"], {}, "argument -k: must be at least 1, got 0"),
    ("neighbours-k-word", ["neighbours", "a red star", "-k", "many"], {}, "argument -k: must be a whole number, got 'many'"),
    ("demo-seed-negative", ["demo", "--seed", "-3"], {}, "argument --seed: must be at least 0, got -3"),
    ("demo-captions-choice", ["demo", "--captions", "per-word"], {}, "argument --captions: invalid choice: 'per-word'"),
    ("demo-config-missing", ["demo", "--config", "{ws}/nope.yaml"], {}, "argument --config: file not found: {ws}/nope.yaml"),
    ("demo-config-folder", ["demo", "--config", "{ws}/folder"], {}, "argument --config: {ws}/folder is a folder, not a file"),
    ("demo-data-file", ["demo", "--data", "{ws}/notes.txt"], {}, "argument --data: {ws}/notes.txt is a file, not a folder"),
    ("demo-data-missing", ["demo", "--data", NOT_FOUND], {}, "argument --data: folder not found: {ws}/nope"),
    ("retrain-no-source", ["retrain"], {}, "the following arguments are required: source"),
    ("retrain-source-missing", ["retrain", NOT_FOUND], {}, "argument source: no such file or folder: {ws}/nope"),
    ("tune-out-folder", ["tune", "{ws}/src", "--out", "{ws}/folder"], {}, "argument --out: {ws}/folder is a folder; give a file name"),
    ("tune-out-under-a-file", ["tune", "{ws}/src", "--out", "{ws}/notes.txt/tuned.yaml"], {},
     "argument --out: cannot write {ws}/notes.txt/tuned.yaml: {ws}/notes.txt is a file, not a folder"),
    ("demo-data-out-file", ["demo-data", "{ws}/notes.txt"], {}, "argument out: {ws}/notes.txt is a file; give a folder"),
    ("demo-data-holdout-negative", ["demo-data", "{ws}/out", "--holdout", "-1"], {}, "argument --holdout: must be at least 0, got -1"),
    ("demo-data-catalogue", ["demo-data", "{ws}/out", "--catalogue", "shop"], {}, "argument --catalogue: invalid choice: 'shop'"),
    ("base-build-steps-zero", ["base", "build", "--steps", "0"], {}, "argument --steps: must be at least 1, got 0"),
    ("base-build-out-file", ["base", "build", "--out", "{ws}/notes.txt"], {}, "argument --out: {ws}/notes.txt is a file; give a folder"),
    ("ingest-workers-zero", ["ingest", "{ws}/src", "--workers", "0"], {}, "argument --workers: must be at least 1, got 0"),
    ("ingest-kind-choice", ["ingest", "{ws}/src", "--kind", "zip"], {}, "argument --kind: invalid choice: 'zip'"),
    ("quarantine-reason-choice", ["quarantine", "--reason", "ugly"], {}, "argument --reason: invalid choice: 'ugly'"),
    ("serve-limit-zero", ["serve", "--limit", "0"], {}, "argument --limit: must be at least 1, got 0"),
    ("compare-one-reference", ["compare", "champion"], {}, "the following arguments are required: b"),
    ("compare-html-folder", ["compare", "champion", "challenger", "--html", "{ws}/folder"], {},
     "argument --html: {ws}/folder is a folder; give a file name"),
    ("models-config-missing", ["models", "--config", "{ws}/nope.yaml"], {}, "argument --config: file not found"),
    # sources and configs
    ("retrain-source-text-file", ["retrain", "{ws}/notes.txt"], {}, "source file {ws}/notes.txt is neither .parquet nor .tar"),
    ("retrain-captions-jsonl-unnamed", ["retrain", "{ws}/jsonl-src"], {},
     "captions file not found: {ws}/jsonl-src/captions.csv (and no *.parquet or *.tar files in {ws}/jsonl-src); "
     "found captions.jsonl: set ingest.captions_file: captions.jsonl in the config"),
    ("retrain-config-unknown-key", ["retrain", "{ws}/src", "--config", "{ws}/unknown-key.yaml"], {}, "unknown config key 'train.stepz'"),
    ("retrain-config-not-yaml", ["retrain", "{ws}/src", "--config", "{ws}/not-yaml.yaml"], {}, "{ws}/not-yaml.yaml"),
    ("retrain-config-wrong-type", ["retrain", "{ws}/src", "--config", "{ws}/wrong-type.yaml"], {}, "train.steps"),
    ("retrain-config-list", ["retrain", "{ws}/src", "--config", "{ws}/list.yaml"], {}, "{ws}/list.yaml"),
    ("ingest-parquet-kind-on-a-folder", ["ingest", "{ws}/src", "--kind", "parquet"], {}, "no .parquet files in {ws}/src"),
    ("serve-unknown-deployment", ["serve", "--deployment", "hourly"], {}, "no deployment named hourly in prefect.yaml"),
    # names and versions that do not exist, on an empty store
    ("promote-alias-no-model", ["promote", "champion"], {}, "cannot resolve 'champion': no registered model named 'pogdiff-demo'"),
    ("promote-version-not-a-number", ["promote", "pogdiff-demo/latest"], {},
     "cannot resolve 'pogdiff-demo/latest': the version after '/' must be a number"),
    ("evaluate-version-no-model", ["evaluate", "7"], {}, "cannot resolve '7': no registered model named 'pogdiff-demo'"),
    ("compare-unknown-run", ["compare", "0" * 32, "champion"], {}, "cannot resolve '00000000000000000000000000000000'"),
    ("index-empty-home", ["index"], {}, "has no images; run `pogdiff ingest SOURCE` first"),
    ("neighbours-empty-home", ["neighbours", "a red star"], {}, "has no captions table; run `pogdiff index` first"),
    # settings and stores: misconfigured, missing, unreachable, without a driver
    ("tracking-uri-not-a-uri", ["models"], {"POGDIFF_MLFLOW_TRACKING_URI": "mlfow://tracking:5000"},
     "mlflow_tracking_uri (Value error, mlfow://tracking:5000 is not an MLflow tracking URI"),
    ("tracking-uri-refused", ["models"], {"POGDIFF_MLFLOW_TRACKING_URI": f"http://admin:{SECRET}@127.0.0.1:{{port}}"},
     "MLflow tracking server http://127.0.0.1:{port} is unreachable: [Errno 111] Connection refused"),
    ("promote-tracking-refused", ["promote", "1"], {"POGDIFF_MLFLOW_TRACKING_URI": f"http://admin:{SECRET}@127.0.0.1:{{port}}"},
     "MLflow tracking server http://127.0.0.1:{port} is unreachable: [Errno 111] Connection refused"),
    ("tracking-uri-no-driver", ["models"], {"POGDIFF_MLFLOW_TRACKING_URI": f"mysql://admin:{SECRET}@127.0.0.1:{{port}}/mlflow"},
     "the store driver 'MySQLdb' is not installed for mysql://***@127.0.0.1:{port}/mlflow: pip install mysqlclient"),
    ("tracking-sqlite-under-a-file", ["models"], {"POGDIFF_MLFLOW_TRACKING_URI": "sqlite:///{ws}/notes.txt/mlflow.db"},
     "invalid settings: mlflow_tracking_uri (Value error, sqlite:///{ws}/notes.txt/mlflow.db: {ws}/notes.txt is a file, not a folder)"),
    ("settings-file-missing", ["models"], {"POGDIFF_SETTINGS_FILE": "{ws}/nope.yaml"}, "cannot read settings file {ws}/nope.yaml"),
    ("settings-file-is-a-folder", ["models"], {"POGDIFF_SETTINGS_FILE": "{ws}/folder"}, "cannot read settings file {ws}/folder"),
    ("settings-file-not-a-mapping", ["models"], {"POGDIFF_SETTINGS_FILE": "{ws}/settings-list.yaml"},
     "settings file {ws}/settings-list.yaml must hold a mapping"),
    ("settings-file-unknown-key", ["models"], {"POGDIFF_SETTINGS_FILE": "{ws}/settings-unknown.yaml"}, "invalid settings: homee"),
    ("settings-home-is-a-file", ["models"], {"POGDIFF_HOME": "{ws}/notes.txt"}, "invalid settings: home (Value error, {ws}/notes.txt is a file, not a folder)"),
    ("settings-task-runner", ["models"], {"POGDIFF_TASK_RUNNER": "spark"}, "invalid settings: task_runner"),
    ("settings-store-timeout", ["models"], {"POGDIFF_STORE_TIMEOUT_S": "0"}, "invalid settings: store_timeout_s"),
    ("prefect-unreachable", ["serve", "--deployment", "retrain-nightly"], {"PREFECT_API_URL": "http://127.0.0.1:{port}/api"},
     "Prefect server http://127.0.0.1:{port}/api is unreachable"),
    ("dataset-uri-is-a-file", ["quarantine"], {"POGDIFF_DATASET_URI": "{ws}/notes.txt"},
     "invalid settings: dataset_uri (Value error, {ws}/notes.txt is a file, not a folder)"),
]


def test_the_table_covers_forty_mistakes_and_every_subcommand():
    from flows.cli import build_parser

    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    commands = {c[1][0] for c in CASES if c[1]}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) <= commands, set(sub.choices) - commands


@pytest.mark.parametrize(("argv", "env", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line(capfd, tmp_path, ws, argv, env, says):
    port = str(free_port())  # nothing listens there
    fill = lambda text: text.replace("{ws}", str(ws)).replace("{port}", port)  # noqa: E731
    env = {"POGDIFF_HOME": str(tmp_path / "home"), **{k: fill(v) for k, v in env.items()}}
    out = run_cli([fill(a) for a in argv], capfd, timeout=CASE_TIMEOUT_S, **env)
    lines = out.output.strip().splitlines()
    assert out.returncode == 2, out.output[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.output[-3000:]
    assert fill(says) in lines[0], lines[0]
    assert "Traceback" not in out.output and SECRET not in out.output


@pytest.mark.parametrize(("command", "timeout"), [(["models"], None), (["promote", "challenger", "--reason", "x"], "2"),
                                             (["compare", "champion", "challenger"], "2"), (["evaluate", "champion"], "2")])
def test_a_silent_tracking_server_is_one_line_within_its_timeout(capfd, tmp_path, silent_server, command, timeout):
    # `models` on the default settings (store_timeout_s 10 s): the alarm is the promised 15 s; the others
    # with a 2 s store timeout, which they must honour as well
    env = {"POGDIFF_STORE_TIMEOUT_S": timeout} if timeout else {}
    out = run_cli(command, capfd, timeout=15 if timeout is None else 5, POGDIFF_HOME=str(tmp_path / "home"),
                  POGDIFF_MLFLOW_TRACKING_URI=silent_server, **env)
    lines = out.output.strip().splitlines()
    host = silent_server.rsplit("@", 1)[1]  # the credentials went to MLflow's own variables: the URI shown has none
    assert out.returncode == 2 and lines == [f"error: MLflow tracking server http://{host} is unreachable: timed out"], out.output
    assert SECRET not in out.output


@pytest.fixture
def refusing_prefect_api():
    """A Prefect API that refuses every request as Prefect's server does a wrong PREFECT_API_AUTH_STRING."""
    class Refuse(BaseHTTPRequestHandler):
        def refuse(self):
            body = b'{"exception_message": "Unauthorized"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = refuse

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()
    thread.join()
    server.server_close()


def test_a_prefect_server_that_refuses_the_auth_string_is_one_line(capfd, tmp_path, refusing_prefect_api):
    from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings

    with temporary_settings({PREFECT_API_AUTH_STRING: f"pogdiff:{SECRET}"}):  # Prefect reads its settings once per process
        out = run_cli(["serve", "--deployment", "retrain-nightly"], capfd, timeout=CASE_TIMEOUT_S,
                      POGDIFF_HOME=str(tmp_path / "home"), PREFECT_API_URL=refusing_prefect_api)
    assert out.returncode == 2 and out.output.strip().splitlines() == [
        f"error: Prefect server {refusing_prefect_api} refused the credentials (PREFECT_API_AUTH_STRING, or PREFECT_API_KEY for Prefect Cloud)"
    ], out.output[-3000:]
    assert SECRET not in out.output


def test_an_mlflow_permission_denied_names_the_account_and_the_permission(monkeypatch):
    """MLflow's basic-auth app answers 403 to an account without the permission (tests/team/test_permissions.py
    on a real server); the line names the server without its credentials, the account, and what it lacks."""
    from mlflow.exceptions import MlflowException

    from flows.cli_errors import explain

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    uri = f"http://reader:{SECRET}@mlflow.example:5000"

    def denied(endpoint: str) -> str:
        return explain(MlflowException(f"API request to endpoint {endpoint} failed with error code 403 != 200. "
                                       "Response body: 'Permission denied'"), uri)

    assert denied("/api/2.0/mlflow/registered-models/alias") == (
        "MLflow tracking server http://mlflow.example:5000 denied account 'reader' the permission for "
        "registered-models/alias: it needs EDIT on the registered model; an MLflow admin grants it")
    assert "it needs MANAGE on the registered model" in denied("/api/2.0/mlflow/registered-models/delete")
    assert "runs/log-batch: it needs EDIT on the experiment" in denied("/api/2.0/mlflow/runs/log-batch")
    assert "it needs READ on the experiment" in denied("/api/2.0/mlflow/experiments/get-by-name?experiment_name=x")
    # a 401 is refused credentials; a port or id holding the digits 401 is neither
    assert explain(MlflowException("API request to endpoint /api/2.0/mlflow/runs/get failed with error code 401 != 200"), uri) == \
        "MLflow tracking server http://mlflow.example:5000 refused the credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
    assert explain(MlflowException("Run 'a4011f' not found"), uri) == "MLflow (http://mlflow.example:5000): Run 'a4011f' not found"


def test_an_empty_registry_lists_as_empty(capfd, tmp_path):
    home = str(tmp_path / "home")
    out = run_cli(["models", "--json"], capfd, POGDIFF_HOME=home)
    assert (out.returncode, out.stdout.strip(), out.stderr) == (0, "[]", "")
    out = run_cli(["models"], capfd, POGDIFF_HOME=home)
    assert out.returncode == 0 and out.output.strip() == \
        "pogdiff-demo: no versions yet (`pogdiff demo` or `pogdiff retrain SOURCE` registers the first)"


def test_an_unexpected_failure_is_one_line_and_its_traceback_is_behind_debug(capfd, tmp_path, monkeypatch):
    import flows.cli_models

    def broken(args, settings):
        return {}["no such key"]  # a bug: a KeyError is never taken for a user's mistake

    monkeypatch.setattr(flows.cli_models, "cmd_models", broken)
    home = str(tmp_path / "home")
    out = run_cli(["models"], capfd, POGDIFF_HOME=home)
    assert out.returncode == 1 and out.output.strip().splitlines() == [
        "error: unexpected KeyError: 'no such key' (a bug in pogdiff; rerun with --debug (or POGDIFF_DEBUG=1) for the traceback)"]
    for debug in (["--debug", "models"], ["models"]):
        out = run_cli(debug, capfd, POGDIFF_HOME=home, **({} if debug[0] == "--debug" else {"POGDIFF_DEBUG": "1"}))
        assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr
        assert out.stderr.strip().splitlines()[-1] == "error: unexpected KeyError: 'no such key' (a bug in pogdiff)"


def test_help_teaches_every_subcommand(capfd):
    from flows.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        assert parser.description and parser.epilog.startswith("example:\n  ") and f"pogdiff {name}" in parser.epilog, name
        for action in parser._actions:
            assert action.help, f"pogdiff {name}: {action.dest} has no help"
    out = run_cli(["--version"], capfd)
    assert out.returncode == 0 and out.stdout.startswith("pogdiff ")


@pytest.mark.slow  # a retrain flow on the session's Prefect server
def test_a_source_with_no_rows_fails_the_retrain_once_in_one_line(capfd, tmp_path, ws, prefect_server):
    out = run_cli(["retrain", str(ws / "src")], capfd, timeout=120, POGDIFF_HOME=str(tmp_path / "home"), PREFECT_API_URL=prefect_server)
    dataset = tmp_path / "home" / "dataset"
    assert out.returncode == 2, out.output[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (f"error: the dataset {dataset} has no training images: every input was "
                                                   "rejected or held out (`pogdiff quarantine` lists why)")
    # Prefect's own lines stay (they are the run's log), but bad input is never retried and no traceback is printed
    assert "Retry" not in out.output and "Traceback" not in out.output, out.output[-3000:]


def test_quarantine_lists_rejected_inputs_in_words(capfd, tmp_path):
    import io

    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(buffer, "PNG")
    (src / "red.png").write_bytes(buffer.getvalue())
    (src / "notes.png").write_text("a text file named like an image")
    (src / "empty.png").write_bytes(b"")
    (src / "captions.csv").write_text("image,caption\nred.png,a red square\nnotes.png,a note\nempty.png,nothing\nmissing.png,gone\n")
    home = str(tmp_path / "home")
    assert run_cli(["ingest", str(src), "--workers", "1"], capfd, POGDIFF_HOME=home).returncode == 0

    listed = run_cli(["quarantine", "--json"], capfd, POGDIFF_HOME=home)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert sorted((r["key"], r["reason"]) for r in rows) == [
        ("empty.png", "not_an_image"), ("missing.png", "missing_file"), ("notes.png", "not_an_image")]
    notes = next(r["message"] for r in rows if r["key"] == "notes.png")
    assert notes == "notes.png: not a recognised image (cannot identify image file)", notes  # words, never a repr

    table = run_cli(["quarantine", "--reason", "missing_file"], capfd, POGDIFF_HOME=home)
    lines = table.stdout.strip().splitlines()
    assert table.returncode == 0 and lines[0] == "1 rejected inputs: 1 missing_file" and len(lines) == 3, table.stdout
    assert lines[2].startswith("missing_file") and "missing.png" in lines[2]
    none = run_cli(["quarantine", "--reason", "too_small"], capfd, POGDIFF_HOME=home)
    assert none.returncode == 0 and none.stdout.startswith("no rejected inputs matching the filters")


def test_an_object_store_refusal_is_one_line_naming_the_store(monkeypatch):
    from botocore.exceptions import ClientError

    from flows.cli_errors import explain

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    err = ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "The AWS Access Key Id you provided does not exist"}},
                      "PutObject")
    assert explain(err) == ("object store http://minio:9000: An error occurred (InvalidAccessKeyId) when calling the "
                            "PutObject operation: The AWS Access Key Id you provided does not exist")

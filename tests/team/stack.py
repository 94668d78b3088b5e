"""The team stack of deploy/team/compose.yaml, stood up as processes on loopback (CI has no container
runtime): PostgreSQL run as an unprivileged user, moto's S3 server in place of MinIO, a real
``mlflow server`` (basic-auth app, PostgreSQL stores, artifacts proxied to the S3 bucket) and a real
``prefect server`` (PostgreSQL, auth string).

The services run with what compose.yaml gives them: its environment, the MLflow server's stores and
artifact destination, deploy/team/postgres/init-databases.sql and deploy/team/mlflow/basic_auth.ini,
each compose host (``postgres:5432``, ``minio:9000``, ...) moved to its loopback address. Credentials
are drawn fresh per stack, with the names of deploy/team/.env.example.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import localserver
import yaml

TEAM = Path(__file__).resolve().parents[2] / "deploy" / "team"
COMPOSE = TEAM / "compose.yaml"
BUCKET = "pogdiff"
REGION = "us-east-1"
# the unprivileged account PostgreSQL runs as when the tests run as root (root cannot run postgres)
POSTGRES_ACCOUNTS = ("postgres", "nobody")
# requests moto_server serves before it checks credentials: the IAM calls that create the pipeline's
# account (user, access key, policy); everything after needs that account's signature
_BOOTSTRAP_REQUESTS = 3


# -- compose.yaml ----------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, variables: dict[str, str]) -> str:
    """``value`` with compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?message}`` and ``$$`` resolved
    from ``variables``; a required variable that is unset raises KeyError naming it."""
    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3)
        given = variables.get(name)
        if op in (":-", "-") and not given:
            return arg
        if op in (":?", "?") and not given:
            raise KeyError(f"{name}: {arg}")
        return given or ""
    return _VARIABLE.sub(one, value)


def compose_file() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service_environment(compose: dict, service: str, variables: dict[str, str]) -> dict[str, str]:
    """The environment compose gives ``service`` (anchors merged), interpolated from ``variables``."""
    env = compose["services"][service].get("environment") or {}
    return {name: interpolate(str(value), variables) for name, value in env.items()}


def command_option(compose: dict, service: str, option: str) -> str:
    """The value of ``--option=value`` in ``service``'s command."""
    for arg in compose["services"][service]["command"]:
        if arg.startswith(f"{option}="):
            return arg.split("=", 1)[1]
    raise KeyError(f"{service} has no {option}= in its command")


# -- processes -------------------------------------------------------------------------------------

def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (initdb, postgres, psql): on PATH, else Debian's
    /usr/lib/postgresql/<version>/bin (the newest); None when there are none."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return versions[-1].parent if versions else None


def moto_server_exe() -> Path:
    return Path(sys.executable).parent / "moto_server"


def unavailable() -> str | None:
    """Why the stack cannot run here (the team tests skip with it), or None."""
    if postgres_bin() is None:
        return ("PostgreSQL's server programs (initdb, postgres) are not installed: `python3 run.py test` installs "
                "Debian's postgresql package where it runs as root with apt-get; elsewhere install PostgreSQL")
    if os.geteuid() == 0 and (_account() is None or shutil.which("setpriv") is None):
        return f"running as root, but no unprivileged account ({', '.join(POSTGRES_ACCOUNTS)}) or no setpriv to run PostgreSQL as"
    return None  # moto's S3 server is a pinned dev dependency: missing, starting it fails the test


def _account() -> pwd.struct_passwd | None:
    for name in POSTGRES_ACCOUNTS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    return None


def _unprivileged(cmd: list[str]) -> list[str]:
    """``cmd`` run as the unprivileged account when this process is root (setpriv execs it: the
    process started is postgres itself, so its pid takes the stop signals); as it is otherwise."""
    if os.geteuid() != 0:
        return cmd
    account = _account()
    return ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups", "--", *cmd]


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Postgres:
    port: int
    user: str
    password: str
    folder: Path  # data directory and socket, owned by the account postgres runs as
    proc: subprocess.Popen

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"


def start_postgres(log: Path, user: str, password: str) -> Postgres:
    """initdb a fresh cluster in a temporary folder (superuser ``user``, password authentication
    only) and start it on a free loopback port, as an unprivileged account when this is root; not
    waited for. The folder is outside pytest's (root-only) temporary tree, so that account can reach it."""
    bin_dir = postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="pogdiff-postgres-"))
    pwfile = folder / "pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if os.geteuid() == 0:
        account = _account()
        for path in (folder, pwfile):
            os.chown(path, account.pw_uid, account.pw_gid)
    with open(log, "a") as out:
        subprocess.run(_unprivileged([str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", user, f"--pwfile={pwfile}",
                                      "--auth=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"]),
                       check=True, stdout=out, stderr=subprocess.STDOUT, cwd=folder)
    pwfile.unlink()
    port = localserver.free_port()
    # a throwaway cluster: no fsync (the suite's stores are thrown away with it)
    proc = subprocess.Popen(
        _unprivileged([str(bin_dir / "postgres"), "-D", str(folder / "data"), "-h", "127.0.0.1", "-p", str(port), "-k", str(folder),
                       "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]),
        stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,  # noqa: SIM115 - for the server's life
    )
    return Postgres(port, user, password, folder, proc)


def _postgres_ready(pg: Postgres) -> bool:
    import psycopg

    try:
        psycopg.connect(pg.url("postgres"), connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


def create_databases(pg: Postgres, log: Path) -> None:
    """deploy/team/postgres/init-databases.sql, run by psql as compose's postgres image runs it."""
    with open(log, "a") as out:
        subprocess.run([str(postgres_bin() / "psql"), "-v", "ON_ERROR_STOP=1", "-q", "-h", "127.0.0.1", "-p", str(pg.port),
                        "-U", pg.user, "-d", "postgres", "-f", str(TEAM / "postgres" / "init-databases.sql")],
                       env={**os.environ, "PGPASSWORD": pg.password}, check=True, stdout=out, stderr=subprocess.STDOUT)


def stop_postgres(pg: Postgres) -> None:
    """Fast shutdown (SIGINT: clients cut, a clean checkpoint), SIGKILL to the group after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        pg.proc.send_signal(signal.SIGINT)
    try:
        pg.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pg.proc.pid, signal.SIGKILL)
        pg.proc.wait()
    shutil.rmtree(pg.folder, ignore_errors=True)


@dataclass
class ObjectStore:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    proc: subprocess.Popen

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A boto3 S3 client of the store, with the pipeline's account unless told otherwise."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key)


def start_s3(log: Path) -> tuple[subprocess.Popen, int]:
    """moto's S3 server on a free loopback port, checking credentials after its bootstrap requests;
    not waited for."""
    port = localserver.free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_BOOTSTRAP_REQUESTS)}
    proc = subprocess.Popen([str(moto_server_exe()), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)  # noqa: SIM115
    return proc, port


def bootstrap_s3(proc: subprocess.Popen, port: int) -> ObjectStore:
    """What compose's minio-init does: the pipeline's own account (readwrite) and the bucket. moto
    draws the account's keys itself (IAM's CreateAccessKey)."""
    import boto3

    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="pogdiff-pipeline")
    key = iam.create_access_key(UserName="pogdiff-pipeline")["AccessKey"]
    iam.put_user_policy(UserName="pogdiff-pipeline", PolicyName="readwrite", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    store = ObjectStore(endpoint, key["AccessKeyId"], key["SecretAccessKey"], BUCKET, proc)
    store.client().create_bucket(Bucket=BUCKET)
    return store


# -- the stack -------------------------------------------------------------------------------------

@dataclass
class TeamStack:
    root: Path
    credentials: dict[str, str]  # deploy/team/.env's variables, as this stack drew them
    postgres: Postgres
    s3: ObjectStore
    mlflow_uri: str
    prefect_api: str
    hosts: dict[str, str]  # compose host:port -> its loopback address
    servers: dict[str, subprocess.Popen] = field(default_factory=dict)  # mlflow, prefect

    @property
    def mlflow_account(self) -> tuple[str, str]:
        return self.credentials["MLFLOW_ADMIN_USERNAME"], self.credentials["MLFLOW_ADMIN_PASSWORD"]

    @property
    def prefect_auth_string(self) -> str:
        return self.credentials["PREFECT_AUTH_STRING"]

    def loopback(self, text: str) -> str:
        """``text`` with each compose host:port (``mlflow:5000``) moved to its loopback address."""
        for host, address in self.hosts.items():
            text = re.sub(rf"(?<=[/@]){re.escape(host)}(?![\w.-])", address, text)
        return text

    def mlflow_api(self, path: str, body: dict) -> dict:
        """POST ``body`` to the MLflow server's REST ``path`` as the admin; its JSON answer."""
        token = base64.b64encode(":".join(self.mlflow_account).encode()).decode()
        request = urllib.request.Request(f"{self.mlflow_uri}{path}", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    def add_mlflow_user(self, username: str, password: str, grants: dict[tuple[str, str], str] | None = None) -> None:
        """An MLflow account (basic-auth's users/create), with ``grants``: (resource type, id) ->
        permission, e.g. ``{("experiment", "1"): "READ", ("registered_model", "m"): "READ"}``
        (MLflow 3's users/permissions/grant)."""
        self.mlflow_api("/api/2.0/mlflow/users/create", {"username": username, "password": password})
        for (resource_type, resource_id), permission in (grants or {}).items():
            self.mlflow_api("/api/3.0/mlflow/users/permissions/grant", {
                "username": username, "resource_type": resource_type, "resource_id": resource_id, "permission": permission})

    def processes(self) -> list[subprocess.Popen]:
        return [*self.servers.values(), self.s3.proc, self.postgres.proc]

    def settings(self, home: Path) -> dict:
        """deploy/team/settings.yaml for a worker whose own home is ``home``: the services at their
        loopback addresses, the shared volume (/data) under the stack's folder."""
        shared = self.root / "shared-volume"
        settings = yaml.safe_load((TEAM / "settings.yaml").read_text())
        for key, value in settings.items():
            value = self.loopback(str(value))
            settings[key] = str(shared / value[len("/data/"):]) if value.startswith("/data/") else value
        settings["home"] = str(home)
        return settings

    def pipeline_env(self, home: Path) -> dict[str, str]:
        """The environment compose.yaml gives the worker (``x-pipeline-env``), at loopback, with its
        settings file written for ``home``."""
        env = {name: self.loopback(interpolate(str(value), self.credentials))
               for name, value in compose_file()["x-pipeline-env"].items()}
        home.mkdir(parents=True, exist_ok=True)
        settings_file = home / "settings.yaml"
        settings_file.write_text(yaml.safe_dump(self.settings(home)))
        env["POGDIFF_SETTINGS_FILE"] = str(settings_file)
        return env

    def leftovers(self) -> list[int]:
        """Processes of the stack still alive (the process groups it started)."""
        return [pid for proc in self.processes() for pid in _group_members(proc.pid)]

    def stop(self) -> None:
        for server in self.servers.values():
            localserver.stop_server(server)
        localserver.stop_server(self.s3.proc)
        stop_postgres(self.postgres)


def draw_credentials() -> dict[str, str]:
    """Fresh values for deploy/team/.env.example's variables (the S3 keys are moto's, set later)."""
    token = lambda: secrets.token_urlsafe(18)  # noqa: E731
    return {"POSTGRES_PASSWORD": token(), "MINIO_ROOT_USER": "unused-by-moto", "MINIO_ROOT_PASSWORD": token(),
            "MLFLOW_ADMIN_USERNAME": "admin", "MLFLOW_ADMIN_PASSWORD": token(), "MLFLOW_FLASK_SERVER_SECRET_KEY": token(),
            "PREFECT_AUTH_STRING": f"pogdiff:{token()}"}


@contextlib.contextmanager
def team_stack(root: Path, timeout: float = 240):
    """The stack, up and answering, in ``root`` (logs: ``*.log`` and each server's folder); stopped
    on exit, every process group it started included."""
    root.mkdir(parents=True, exist_ok=True)
    compose = compose_file()
    credentials = draw_credentials()
    started: list = []
    try:
        s3_proc, s3_port = start_s3(root / "s3.log")  # moto takes longest to import: first
        started.append(lambda: localserver.stop_server(s3_proc))
        pg = start_postgres(root / "postgres.log", compose["services"]["postgres"]["environment"]["POSTGRES_USER"],
                            credentials["POSTGRES_PASSWORD"])
        started.append(lambda: stop_postgres(pg))
        localserver.wait_for(lambda: _postgres_ready(pg), 60, "PostgreSQL", [pg.proc], log=root / "postgres.log")
        create_databases(pg, root / "postgres.log")
        localserver.wait_for(lambda: _port_open(s3_port), 60, "the S3 server", [s3_proc], log=root / "s3.log")
        store = bootstrap_s3(s3_proc, s3_port)
        credentials.update(S3_ACCESS_KEY_ID=store.access_key, S3_SECRET_ACCESS_KEY=store.secret_key)

        mlflow_port, prefect_port = localserver.free_port(), localserver.free_port()
        hosts = {"postgres:5432": f"127.0.0.1:{pg.port}", "minio:9000": f"127.0.0.1:{s3_port}",
                 "mlflow:5000": f"127.0.0.1:{mlflow_port}", "prefect:4200": f"127.0.0.1:{prefect_port}"}
        stack = TeamStack(root, credentials, pg, store, f"http://127.0.0.1:{mlflow_port}",
                          f"http://127.0.0.1:{prefect_port}/api", hosts)
        # both servers migrate their PostgreSQL databases at the same time
        (root / "mlflow").mkdir()
        auth_ini = configparser.ConfigParser()
        auth_ini.read(TEAM / "mlflow" / "basic_auth.ini")
        stack.servers["mlflow"] = localserver.start_mlflow_server(
            root / "mlflow", mlflow_port, auth=stack.mlflow_account,
            backend_store_uri=stack.loopback(command_option(compose, "mlflow", "--backend-store-uri")),
            artifacts_destination=command_option(compose, "mlflow", "--artifacts-destination"),
            auth_settings={key: stack.loopback(value) for key, value in auth_ini["mlflow"].items()},
            env={name: stack.loopback(value) for name, value in service_environment(compose, "mlflow", credentials).items()
                 if name != "MLFLOW_AUTH_CONFIG_PATH"})  # the server's own ini, written from basic_auth.ini
        started.append(lambda: localserver.stop_server(stack.servers["mlflow"]))
        (root / "prefect").mkdir()
        prefect_env = service_environment(compose, "prefect", credentials)
        prefect_env["PREFECT_SERVER_DATABASE_HOST"], prefect_env["PREFECT_SERVER_DATABASE_PORT"] = "127.0.0.1", str(pg.port)
        prefect_env.pop("PREFECT_UI_API_URL")  # no UI on loopback
        stack.servers["prefect"] = localserver.start_prefect_server(root / "prefect", prefect_port, env=prefect_env)
        started.append(lambda: localserver.stop_server(stack.servers["prefect"]))
        localserver.wait_for(lambda: localserver.healthy(stack.mlflow_uri), timeout, "the MLflow server",
                             [stack.servers["mlflow"]], log=root / "mlflow" / "server.log")
        localserver.wait_for(lambda: localserver.healthy(stack.prefect_api), timeout, "the Prefect server",
                             [stack.servers["prefect"]], log=root / "prefect" / "server.log")
    except BaseException:
        for stop in reversed(started):
            with contextlib.suppress(Exception):
                stop()
        raise
    try:
        yield stack
    finally:
        stack.stop()



"""Where everything lives: one settings object, from env vars (``POGDIFF_*``) and an optional YAML file.

Defaults put every store under ``./var`` of the checkout, so a fresh clone needs no setup. A team
points the same fields at shared stores, e.g. ``POGDIFF_LANCEDB_URI=s3://bucket/lancedb``,
``POGDIFF_MLFLOW_TRACKING_URI=http://mlflow:5000``. The Prefect API is Prefect's own variable,
``PREFECT_API_URL``, so ``pogdiff serve``, ``prefect deploy`` and a worker read the same one.
The optional file is named by ``POGDIFF_SETTINGS_FILE``; environment variables win over it, and
keyword arguments of :func:`load_settings` over both.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AliasChoices, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, YamlConfigSettingsSource

from pogdiff.config import ConfigError
from storage.links import has_scheme, redact_uri

REPO_ROOT = Path(__file__).resolve().parent.parent
SETTINGS_FILE_VAR = "POGDIFF_SETTINGS_FILE"
# The Prefect API's variable before PREFECT_API_URL named it for both scheduling paths: still read, with a warning.
DEPRECATED_API_VAR = "POGDIFF_PREFECT_API_URL"
# what MLflow's tracking and registry stores accept (a "+driver" suffix, postgresql+psycopg2, is allowed)
TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc")


class _SettingsFile(YamlConfigSettingsSource):
    """pydantic-settings' YAML source on the file ``POGDIFF_SETTINGS_FILE`` names (none if unset). A
    named file that is missing, unreadable, not YAML or not a mapping is one ConfigError line."""

    def __init__(self, settings_cls: type[BaseSettings]):
        super().__init__(settings_cls, yaml_file=os.environ.get(SETTINGS_FILE_VAR) or None, yaml_file_encoding="utf-8")
        # The file's keys as written: a key is a field name exactly (``HOME:`` is an unknown key, not
        # ``home``), where the base class would match them case-insensitively like env var names.
        self.init_kwargs = dict(self.yaml_data)

    @staticmethod
    def _existing_files(files: Any) -> list[Path]:
        return [Path(files)] if files else []  # a file that was named must exist: _read_file says why not

    def _read_file(self, file_path: Path) -> dict[str, Any]:
        try:
            data = yaml.safe_load(file_path.read_text(encoding=self.yaml_file_encoding)) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read settings file {file_path}: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"settings file {file_path} must hold a mapping")
        return data


def _http_or_none(uri: str | None) -> str | None:
    return uri.rstrip("/") if uri and uri.startswith(("http://", "https://")) else None


class Settings(BaseSettings):
    """Every location the pipeline reads or writes. A location left unset (or empty) defaults under
    ``home``; fields are validated in order, so each default sees ``home`` (and the tracking URI)
    already validated, and a default value is validated like a given one (``validate_default``)."""

    model_config = SettingsConfigDict(env_prefix="POGDIFF_", extra="forbid", frozen=True, validate_default=True,
                                      populate_by_name=True)

    home: Path = REPO_ROOT / "var"
    data_root: Path | None = None  # generated / downloaded sources; default <home>/data
    dataset_uri: Path | str | None = None  # Parquet dataset: a local folder (a Path) or s3://bucket/prefix; default <home>/dataset
    lancedb_uri: str | None = None  # default <home>/lancedb
    runs_dir: Path | None = None  # training outputs and checkpoints; default <home>/runs
    mlflow_tracking_uri: str | None = None  # default sqlite:///<home>/mlflow.db
    mlflow_artifact_root: str | None = None  # default <home>/mlartifacts; a tracking server's own store
    mlflow_ui_url: str | None = None  # where reviewers open runs; default the tracking URI when it is http(s)
    # Prefect's own PREFECT_API_URL (env names match case-insensitively and the alias carries no prefix),
    # or the settings file's prefect_api_url; unset: Prefect's ephemeral server
    prefect_api_url: str | None = Field(None, validation_alias=AliasChoices("prefect_api_url", DEPRECATED_API_VAR))
    prefect_home: Path | None = None  # default <home>/prefect
    # Where a deployment's `config: NAME` or relative config path is looked up first (then the
    # repository's configs/, which holds `demo`); default <home>/configs
    configs_dir: Path | None = None
    # Where a flow's mapped tasks (caption embedding shards) run: a thread pool in the flow's process,
    # or a Dask cluster (pip install '.[dask]'; task_runner_address of a running scheduler, else a
    # temporary local cluster per flow run).
    task_runner: Literal["threads", "dask"] = "threads"
    task_runner_workers: int | None = Field(None, ge=1)
    task_runner_address: str | None = None
    # First retry delay of the IO tasks (ingest, snapshot, MLflow run and registry calls), doubling per
    # retry (3 retries, +-50% jitter): the default rides out a store restarting within about 15 s.
    io_retry_delay_s: float = Field(2.0, gt=0)
    # How long a command waits for the MLflow tracking server's first answer before saying it is
    # unreachable, and how often MLflow's own HTTP client retries a request (MLflow's defaults, 7
    # retries with doubling backoff, keep a command waiting minutes on a server that is down).
    # MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT in the environment win.
    store_timeout_s: float = Field(10.0, gt=0)
    store_retries: int = Field(3, ge=0)

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        return home.resolve()

    @field_validator("data_root", "dataset_uri", "lancedb_uri", "runs_dir", "mlflow_tracking_uri", "mlflow_artifact_root",
                     "mlflow_ui_url", "prefect_home", "configs_dir")
    @classmethod
    def _default_under_home(cls, value: Any, info: ValidationInfo) -> Any:
        if value or "home" not in info.data:  # given, or home itself is invalid (that error is reported)
            return value
        home: Path = info.data["home"]
        tracking = info.data.get("mlflow_tracking_uri")
        return {
            "data_root": lambda: home / "data",
            "dataset_uri": lambda: home / "dataset",
            "lancedb_uri": lambda: str(home / "lancedb"),
            "runs_dir": lambda: home / "runs",
            "mlflow_tracking_uri": lambda: f"sqlite:///{home / 'mlflow.db'}",
            # A tracking server stores artifacts where it was told to (--artifacts-destination).
            "mlflow_artifact_root": lambda: None if _http_or_none(tracking) else str(home / "mlartifacts"),
            "mlflow_ui_url": lambda: _http_or_none(tracking),
            "prefect_home": lambda: home / "prefect",
            "configs_dir": lambda: home / "configs",
        }[info.field_name]()

    @field_validator("dataset_uri")
    @classmethod
    def _path_or_uri(cls, value: Path | str | None) -> Path | str | None:
        # a URI stays a string (a Path would fold s3://b/x into s3:/b/x); anything else is a local Path
        return value if value is None or has_scheme(value) else Path(value)

    @field_validator("home", "data_root", "dataset_uri", "runs_dir", "prefect_home", "configs_dir", "lancedb_uri")
    @classmethod
    def _not_a_file(cls, value: Any) -> Any:
        if value and not has_scheme(value) and Path(value).is_file():
            raise ValueError(f"{value} is a file, not a folder")
        return value

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _tracking_scheme(cls, uri: str | None) -> str | None:
        scheme = urlsplit(uri).scheme.split("+")[0].lower() if uri and has_scheme(uri) else ""
        if scheme and scheme not in TRACKING_SCHEMES:
            raise ValueError(f"{redact_uri(uri)} is not an MLflow tracking URI: give sqlite:///FILE, postgresql://HOST/DB, "
                             "mysql://HOST/DB, http(s)://HOST:PORT or a local folder")
        if scheme == "sqlite":  # MLflow creates the database's folder: a file in its way fails deep inside it
            for parent in Path(uri.split(":///", 1)[-1].split("?", 1)[0]).parents:  # sqlite:///rel, sqlite:////abs
                if parent.exists():
                    if not parent.is_dir():
                        raise ValueError(f"{uri}: {parent} is a file, not a folder")
                    break
        return uri

    def source_path(self, source: str | Path) -> Path:
        """Where a flow's ``source`` is: an absolute path as it is, a relative one under ``data_root``
        (so a deployment's default source follows POGDIFF_HOME, not the worker's working directory)."""
        return Path(source) if Path(source).is_absolute() else Path(self.data_root) / source

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return init_settings, env_settings, _SettingsFile(settings_cls)  # earlier sources win


def load_settings(**overrides: Any) -> Settings:
    """Settings from env + file, with ``overrides`` on top; errors name the bad key."""
    if os.environ.get(DEPRECATED_API_VAR):
        warnings.warn(f"{DEPRECATED_API_VAR} is deprecated: set PREFECT_API_URL, which `prefect deploy`, workers and "
                      f"`pogdiff serve` all read ({DEPRECATED_API_VAR} is used only while PREFECT_API_URL is unset)",
                      FutureWarning, stacklevel=2)
    try:
        return Settings(**overrides)
    except ValidationError as err:
        keys = ", ".join(".".join(str(p) for p in e["loc"]) + f" ({e['msg']})" for e in err.errors())
        raise ConfigError(f"invalid settings: {keys}") from None

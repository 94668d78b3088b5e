"""Where everything lives: one settings object, from env vars (``POGDIFF_*``) and an optional YAML file.

Defaults put every store under ``./var`` of the checkout, so a fresh clone needs no setup. A team
points the same fields at shared stores, e.g. ``POGDIFF_LANCEDB_URI=s3://bucket/lancedb``,
``POGDIFF_MLFLOW_TRACKING_URI=http://mlflow:5000``, ``POGDIFF_PREFECT_API_URL=http://prefect:4200/api``.
The optional file is named by ``POGDIFF_SETTINGS_FILE``; environment variables win over it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pogdiff.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


class _YamlFile(PydanticBaseSettingsSource):
    def get_field_value(self, field, field_name):  # pragma: no cover - required by the ABC, unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("POGDIFF_SETTINGS_FILE")
        if not path:
            return {}
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read settings file {path}: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"settings file {path} must hold a mapping")
        return data


def _http_or_none(uri: str | None) -> str | None:
    return uri.rstrip("/") if uri and uri.startswith(("http://", "https://")) else None


class Settings(BaseSettings):
    """Every location the pipeline reads or writes."""

    model_config = SettingsConfigDict(env_prefix="POGDIFF_", extra="forbid", frozen=True)

    home: Path = REPO_ROOT / "var"
    data_root: Path | None = None  # generated / downloaded sources; default <home>/data
    dataset_uri: Path | None = None  # Parquet dataset; default <home>/dataset
    lancedb_uri: str | None = None  # default <home>/lancedb
    runs_dir: Path | None = None  # training outputs and checkpoints; default <home>/runs
    mlflow_tracking_uri: str | None = None  # default sqlite:///<home>/mlflow.db
    mlflow_artifact_root: str | None = None  # default <home>/mlartifacts; a tracking server's own store
    mlflow_ui_url: str | None = None  # where reviewers open runs; default the tracking URI when it is http(s)
    prefect_api_url: str | None = None  # unset: Prefect's ephemeral server
    prefect_home: Path | None = None  # default <home>/prefect
    # Where a flow's mapped tasks (caption embedding shards) run: a thread pool in the flow's process,
    # or a Dask cluster (pip install '.[dask]'; task_runner_address of a running scheduler, else a
    # temporary local cluster per flow run).
    task_runner: Literal["threads", "dask"] = "threads"
    task_runner_workers: int | None = Field(None, ge=1)
    task_runner_address: str | None = None

    @model_validator(mode="after")
    def _fill(self) -> "Settings":
        home = self.home.resolve()
        fill = {
            "home": home,
            "data_root": self.data_root or home / "data",
            "dataset_uri": self.dataset_uri or home / "dataset",
            "lancedb_uri": self.lancedb_uri or str(home / "lancedb"),
            "runs_dir": self.runs_dir or home / "runs",
            "mlflow_tracking_uri": self.mlflow_tracking_uri or f"sqlite:///{home / 'mlflow.db'}",
            # A tracking server stores artifacts where it was told to (--artifacts-destination).
            "mlflow_artifact_root": self.mlflow_artifact_root
            or (None if _http_or_none(self.mlflow_tracking_uri) else str(home / "mlartifacts")),
            "mlflow_ui_url": self.mlflow_ui_url or _http_or_none(self.mlflow_tracking_uri),
            "prefect_home": self.prefect_home or home / "prefect",
        }
        for k, v in fill.items():
            object.__setattr__(self, k, v)
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return init_settings, env_settings, _YamlFile(settings_cls)


def load_settings(**overrides: Any) -> Settings:
    """Settings from env + file, with ``overrides`` on top; errors name the bad key."""
    try:
        return Settings(**overrides)
    except ValidationError as err:
        keys = ", ".join(".".join(str(p) for p in e["loc"]) + f" ({e['msg']})" for e in err.errors())
        raise ConfigError(f"invalid settings: {keys}") from None

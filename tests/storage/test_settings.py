"""Settings: defaults under one home, env vars with the POGDIFF_ prefix, an optional YAML file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pogdiff.config import ConfigError
from storage.settings import load_settings


def test_defaults_derive_from_home(tmp_path, monkeypatch):
    monkeypatch.setenv("POGDIFF_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    s = load_settings()
    assert s.dataset_uri == tmp_path / "dataset"
    assert s.lancedb_uri == str(tmp_path / "lancedb")
    assert s.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert s.prefect_api_url is None


def test_env_overrides_one_location(tmp_path, monkeypatch):
    monkeypatch.setenv("POGDIFF_HOME", str(tmp_path))
    monkeypatch.setenv("POGDIFF_LANCEDB_URI", "s3://bucket/lancedb")
    monkeypatch.setenv("POGDIFF_MLFLOW_TRACKING_URI", "http://mlflow:5000")
    s = load_settings()
    assert s.lancedb_uri == "s3://bucket/lancedb" and s.mlflow_tracking_uri == "http://mlflow:5000"
    assert s.dataset_uri == tmp_path / "dataset"


def test_settings_file_and_env_precedence(tmp_path, monkeypatch):
    f = tmp_path / "settings.yaml"
    f.write_text(f"home: {tmp_path}\nruns_dir: {tmp_path / 'r'}\nprefect_api_url: http://p:4200/api\n")
    monkeypatch.setenv("POGDIFF_SETTINGS_FILE", str(f))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert load_settings().prefect_api_url == "http://p:4200/api"
    monkeypatch.setenv("PREFECT_API_URL", "http://env:4200/api")  # Prefect's own variable, as its CLI and workers read it
    s = load_settings()
    assert s.runs_dir == tmp_path / "r"
    assert s.prefect_api_url == "http://env:4200/api"


def test_the_old_prefect_api_variable_is_read_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("POGDIFF_PREFECT_API_URL", "http://old:4200/api")
    with pytest.warns(FutureWarning, match="POGDIFF_PREFECT_API_URL is deprecated: set PREFECT_API_URL"):
        assert load_settings(home=tmp_path).prefect_api_url == "http://old:4200/api"
    monkeypatch.setenv("PREFECT_API_URL", "http://new:4200/api")
    with pytest.warns(FutureWarning):
        assert load_settings(home=tmp_path).prefect_api_url == "http://new:4200/api"


def test_relative_sources_and_configs_live_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("POGDIFF_HOME", str(tmp_path))
    s = load_settings()
    assert s.source_path("demo-catalogue") == tmp_path / "data" / "demo-catalogue"
    assert s.source_path("/srv/catalogue") == Path("/srv/catalogue")
    assert s.configs_dir == tmp_path / "configs"
    monkeypatch.setenv("POGDIFF_DATA_ROOT", str(tmp_path / "shared"))
    assert load_settings().source_path("demo-catalogue") == tmp_path / "shared" / "demo-catalogue"


def test_unknown_key_in_settings_file_is_named(tmp_path, monkeypatch):
    f = tmp_path / "settings.yaml"
    f.write_text("lancedb_url: /x\n")
    monkeypatch.setenv("POGDIFF_SETTINGS_FILE", str(f))
    with pytest.raises(ConfigError, match="lancedb_url"):
        load_settings()


def test_keywords_win_over_env_and_file_and_defaults_follow_the_winner(tmp_path, monkeypatch):
    f = tmp_path / "settings.yaml"
    f.write_text("lancedb_uri: /from-file\nmlflow_tracking_uri: http://file:5000/\n")
    monkeypatch.setenv("POGDIFF_SETTINGS_FILE", str(f))
    monkeypatch.setenv("POGDIFF_HOME", str(tmp_path / "env-home"))
    monkeypatch.setenv("POGDIFF_LANCEDB_URI", "/from-env")
    s = load_settings(home=tmp_path / "kw-home", lancedb_uri="/from-kw")
    assert s.lancedb_uri == "/from-kw" and s.home == tmp_path / "kw-home"
    assert s.runs_dir == tmp_path / "kw-home" / "runs"  # derived from the home that won
    assert s.mlflow_tracking_uri == "http://file:5000/" and s.mlflow_ui_url == "http://file:5000"
    assert s.mlflow_artifact_root is None  # a tracking server keeps its own artifacts


def test_unreadable_settings_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("POGDIFF_SETTINGS_FILE", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="cannot read settings file .*nope.yaml"):
        load_settings()
    (tmp_path / "list.yaml").write_text("- 1\n")
    monkeypatch.setenv("POGDIFF_SETTINGS_FILE", str(tmp_path / "list.yaml"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_settings()
    (tmp_path / "upper.yaml").write_text("HOME: /x\n")
    monkeypatch.setenv("POGDIFF_SETTINGS_FILE", str(tmp_path / "upper.yaml"))
    with pytest.raises(ConfigError, match=r"invalid settings: HOME \(Extra inputs"):
        load_settings()


@pytest.mark.slow
def test_io_retry_delay_sets_the_io_tasks_backoff(tmp_path):
    # in a fresh interpreter: the IO tasks read it once, when they are defined
    code = "from tasks.ingest import ingest; print(ingest.retry_delay_seconds, ingest.retries)"
    env = {**os.environ, "POGDIFF_HOME": str(tmp_path), "POGDIFF_IO_RETRY_DELAY_S": "0.5"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["[0.5,", "1.0,", "2.0]", "3"]
    with pytest.raises(ConfigError, match=r"io_retry_delay_s \(Input should be greater than 0\)"):
        load_settings(home=tmp_path, io_retry_delay_s=0)

"""Settings: defaults under one home, env vars with the POGDIFF_ prefix, an optional YAML file."""

import pytest

from pogdiff.config import ConfigError
from storage.settings import load_settings


def test_defaults_derive_from_home(tmp_path, monkeypatch):
    monkeypatch.setenv("POGDIFF_HOME", str(tmp_path))
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
    monkeypatch.setenv("POGDIFF_PREFECT_API_URL", "http://env:4200/api")
    s = load_settings()
    assert s.runs_dir == tmp_path / "r"
    assert s.prefect_api_url == "http://env:4200/api"


def test_unknown_key_in_settings_file_is_named(tmp_path, monkeypatch):
    f = tmp_path / "settings.yaml"
    f.write_text("lancedb_url: /x\n")
    monkeypatch.setenv("POGDIFF_SETTINGS_FILE", str(f))
    with pytest.raises(ConfigError, match="lancedb_url"):
        load_settings()

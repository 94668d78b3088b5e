"""The command line: bad input on the demo path is one clear line naming the file, not a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _pogdiff(*args, home):
    env = {"PATH": "/usr/bin:/bin", "POGDIFF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_missing_source_folder_is_one_line(tmp_path):
    missing = tmp_path / "no-such-folder"
    out = _pogdiff("demo", "--data", str(missing), home=tmp_path / "home")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: source folder not found: {missing}"]
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize("content", [b"path,text\nimages/a.png,a red circle\n", b"\xff\xfe\x00garbage\x00\n"])
def test_unreadable_captions_file_is_one_line(tmp_path, content):
    src = tmp_path / "src"
    src.mkdir()
    (src / "captions.csv").write_bytes(content)
    out = _pogdiff("demo", "--data", str(src), home=tmp_path / "home")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(src / "captions.csv") in lines[0]
    assert "Traceback" not in out.stdout + out.stderr


def test_unknown_config_key_is_named_before_any_work(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  stepz: 3\n")
    out = _pogdiff("demo", "--config", str(cfg), home=tmp_path / "home")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: unknown config key 'train.stepz'"
    assert not (tmp_path / "home" / "data").exists()  # nothing generated, nothing ingested

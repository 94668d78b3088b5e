"""The command line, in process: bad input on the demo path is one clear line naming the file, not a traceback."""

import json
from pathlib import Path

import pytest
from clirunner import run_cli



@pytest.fixture
def pogdiff(capfd):
    return lambda *args, home: run_cli(list(args), capfd, POGDIFF_HOME=str(home))


def test_missing_source_folder_is_one_line(pogdiff, tmp_path):
    missing = tmp_path / "no-such-folder"
    out = pogdiff("demo", "--data", str(missing), home=tmp_path / "home")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: pogdiff demo: argument --data: folder not found: {missing} "
                                               "(see `pogdiff demo --help`)"]
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize("content", [b"path,text\nimages/a.png,a red circle\n", b"\xff\xfe\x00garbage\x00\n"])
def test_unreadable_captions_file_is_one_line(pogdiff, tmp_path, content):
    src = tmp_path / "src"
    src.mkdir()
    (src / "captions.csv").write_bytes(content)
    out = pogdiff("demo", "--data", str(src), home=tmp_path / "home")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(src / "captions.csv") in lines[0]
    assert "Traceback" not in out.stdout + out.stderr


def test_unknown_config_key_is_named_before_any_work(pogdiff, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  stepz: 3\n")
    out = pogdiff("demo", "--config", str(cfg), home=tmp_path / "home")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: unknown config key 'train.stepz'"
    assert not (tmp_path / "home" / "data").exists()  # nothing generated, nothing ingested


def _tiny_source(folder: Path) -> Path:
    import io

    from PIL import Image

    folder.mkdir(parents=True)
    lines = ["image,caption"]
    for i in range(3):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(buffer, "PNG")
        (folder / f"{i}.png").write_bytes(buffer.getvalue())
        lines.append(f"{i}.png,shape {i}")
    (folder / "bad.png").write_bytes(b"")
    lines.append("bad.png,zero bytes")
    (folder / "captions.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_ingest_json_report_and_rerun_is_a_no_op(pogdiff, tmp_path):
    src = _tiny_source(tmp_path / "src")
    first = pogdiff("ingest", str(src), "--json", home=tmp_path / "home")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert (report["accepted"], report["rejected"], report["source_kind"]) == (3, {"not_an_image": 1}, "folder")
    assert len(report["snapshot_id"]) == 16
    again = json.loads(pogdiff("ingest", str(src), "--json", home=tmp_path / "home").stdout)
    assert (again["accepted"], again["unchanged"], again["snapshot_id"]) == (0, 3, report["snapshot_id"])


def test_ingest_prints_a_report_table_and_bad_sources_are_one_line(pogdiff, tmp_path):
    src = _tiny_source(tmp_path / "src")
    out = pogdiff("ingest", str(src), "--workers", "1", home=tmp_path / "home")
    assert out.returncode == 0, out.stderr
    rows = {" ".join(line.strip("│┃ ").split()) for line in out.stdout.splitlines()}
    assert {"accepted │ 3", "unchanged │ 0", "rejected: not_an_image │ 1"} <= rows
    missing = pogdiff("ingest", str(tmp_path / "nowhere"), home=tmp_path / "home")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: pogdiff ingest: argument source: no such file or folder: "
                                                   f"{tmp_path / 'nowhere'} (see `pogdiff ingest --help`)"]


def test_the_demo_links_point_where_its_printed_ui_commands_serve(tmp_path, monkeypatch):
    from flows.cli import demo_ui_urls
    from storage.settings import load_settings

    monkeypatch.setenv("POGDIFF_HOME", str(tmp_path))
    for key in ("POGDIFF_MLFLOW_UI_URL", "POGDIFF_MLFLOW_TRACKING_URI", "POGDIFF_PREFECT_API_URL"):
        monkeypatch.setenv(key, "")  # unset, and restored after the test whatever the demo sets
    settings, prefect_ui = demo_ui_urls(load_settings())
    # `mlflow ui --port 5000` and `prefect server start` serve on 127.0.0.1 by default
    assert (settings.mlflow_ui_url, prefect_ui) == ("http://127.0.0.1:5000", "http://127.0.0.1:4200")
    assert load_settings().mlflow_ui_url == "http://127.0.0.1:5000"  # as the flow's tasks load it
    # configured addresses win: Prefect derives its UI address from its API address
    monkeypatch.setenv("POGDIFF_MLFLOW_UI_URL", "https://mlflow.example.org")
    monkeypatch.setenv("POGDIFF_PREFECT_API_URL", "http://prefect.example.org:4200/api")
    settings, prefect_ui = demo_ui_urls(load_settings())
    assert (settings.mlflow_ui_url, prefect_ui) == ("https://mlflow.example.org", None)


def test_demo_data_writes_the_families_catalogue_with_held_out_photos(pogdiff, tmp_path):
    import csv

    out = pogdiff("demo-data", str(tmp_path / "families"), "--catalogue", "families", "--holdout", "2", home=tmp_path / "home")
    assert out.returncode == 0, out.output
    with open(tmp_path / "families" / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    held = [r for r in rows if r["split"] == "holdout"]
    assert len(held) == 2 * 20 and len(rows) - len(held) == 733  # 20 products; 2 held-out photos each
    assert {"Vexo", "Vexo Gesh", "Nembo"} <= {r["individual"] for r in rows}
    assert out.stdout.strip() == f"wrote 733 images of 20 individuals ({len({r['caption'] for r in rows if r['split'] == 'train'})} " \
                                 f"distinct captions) and 40 held-out photos to {tmp_path / 'families'}"


def test_the_end_of_run_table_is_metric_rows_by_bucket_columns_within_100_columns(capsys):
    from flows.cli import print_comparison
    from pogdiff.glossary import GROUPS

    names = ("grecall", "accuracy", "holdout_accuracy", "copy_rate", "frechet_pixels16")
    new = {f"{b}/{n}": 100.5 + i if n == "frechet_pixels16" else 0.5 + i / 100 for i, b in enumerate(GROUPS) for n in names}
    before = {k: v - 0.25 for k, v in new.items() if not k.startswith("few/")}  # the champion had no few bucket
    print_comparison(new, before, "champion v12")
    lines = capsys.readouterr().out.strip().splitlines()
    assert max(len(line) for line in lines) <= 100
    assert lines[0].split() == ["metric", *GROUPS]
    grecall = lines.index(next(line for line in lines if line.startswith("grecall ↑")))
    assert lines[grecall].split() == ["grecall", "↑", "0.500", "(+0.250)", "0.510", "(+0.250)", "0.520", "0.530", "(+0.250)"]
    assert lines[grecall + 1].split() == ["↳", "champion", "v12", "0.250", "0.260", "—", "0.280"]
    assert any(line.startswith("copy_rate ↓") for line in lines)

"""The documentation's screenshots of the MLflow UI as a reviewer opens it, reproducible: the
experiment (its runs table), the run of a registered version and the version itself.

    python3 run.py demo                                   # a store with a registered version (var/)
    .venv/bin/python docs/screenshot.py                   # -> docs/img/mlflow_experiment.png, mlflow_run.png, model_version.png

Serves the settings' MLflow store (``POGDIFF_HOME`` / ``POGDIFF_MLFLOW_TRACKING_URI``, as the demo
used them) with a real ``mlflow server`` on a free loopback port, or uses the server the tracking
URI names, opens the pages our links open (storage/mlflow/ui.py) in headless Chromium at 1280 x 1000
(tests/browser.py: Debian's ``chromium``) and writes the PNGs into ``--out``. ``--model`` defaults to
configs/demo.yaml's ``registry.model_name``, ``--version`` to the newest version.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project, and the test helpers that start servers and browsers

from browser import missing, screenshot  # noqa: E402
from localserver import free_port, healthy, start_mlflow_server, stop_server, wait_for  # noqa: E402

from storage.mlflow import connection, registry, ui  # noqa: E402
from storage.settings import load_settings  # noqa: E402
from tasks.config import load_config  # noqa: E402

OUT = ROOT / "docs" / "img"
HOST = "127.0.0.2"  # loopback (Linux routes all of 127/8 to lo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=load_config(ROOT / "configs" / "demo.yaml").registry.model_name)
    p.add_argument("--version", help="default: the newest version")
    p.add_argument("--out", type=Path, default=OUT, help="folder for the PNGs")
    args = p.parse_args(argv)
    if reason := missing():
        print(f"error: {reason}", file=sys.stderr)
        return 2
    settings = load_settings()
    connection.configure(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)
    try:
        version = args.version or registry.list_versions(args.model)[0]["version"]  # newest first
    except (LookupError, IndexError):
        print(f"error: no version of {args.model!r} in {settings.mlflow_tracking_uri} (run `python3 run.py demo` first)", file=sys.stderr)
        return 2
    run_id = registry.version_run_id(args.model, version)

    def shoot(url: str) -> None:
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient().get_run(run_id).info.experiment_id
        pages = {"mlflow_experiment.png": ui.experiment_link(url, experiment), "mlflow_run.png": ui.run_link(url, run_id),
                 "model_version.png": ui.version_link(url, args.model, version)}
        for name, page in pages.items():
            print(screenshot(page, args.out / name))

    if settings.mlflow_tracking_uri.startswith(("http://", "https://")):
        shoot(settings.mlflow_tracking_uri.rstrip("/"))
        return 0
    with tempfile.TemporaryDirectory(prefix="mlflow-ui-") as root:
        port = free_port()
        # not 127.0.0.1 or localhost: there the UI opens its assistant panel over a third of the
        # page on a first visit, which a reviewer on a team server never sees
        server = start_mlflow_server(Path(root), port, backend_store_uri=settings.mlflow_tracking_uri, host=HOST)
        try:
            url = f"http://{HOST}:{port}"
            wait_for(lambda: healthy(url), 240, "the mlflow server", [server], interval=0.5, log=Path(root) / "server.log")
            shoot(url)
        finally:
            stop_server(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())

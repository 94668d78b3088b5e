"""The README's screenshot of a registered model version in the MLflow UI, reproducible.

    python3 run.py demo                                   # a store with a registered version (var/)
    .venv/bin/python docs/screenshot.py                   # -> docs/img/model_version.png

Serves the settings' MLflow store (``POGDIFF_HOME`` / ``POGDIFF_MLFLOW_TRACKING_URI``, as the demo
used them) with a real ``mlflow server`` on a free loopback port, or uses the server the tracking
URI names, opens ``#/models/<model>/versions/<version>`` in headless Chromium at 1280 x 1000
(tests/browser.py: Debian's ``chromium``) and writes the PNG. ``--model`` defaults to
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

from storage.mlflow import connection, registry  # noqa: E402
from storage.settings import load_settings  # noqa: E402
from tasks.config import load_config  # noqa: E402

OUT = ROOT / "docs" / "img" / "model_version.png"
HOST = "127.0.0.2"  # loopback (Linux routes all of 127/8 to lo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=load_config(ROOT / "configs" / "demo.yaml").registry.model_name)
    p.add_argument("--version", help="default: the newest version")
    p.add_argument("--out", type=Path, default=OUT)
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
    page = f"#/models/{args.model}/versions/{version}"
    if settings.mlflow_tracking_uri.startswith(("http://", "https://")):
        print(screenshot(f"{settings.mlflow_tracking_uri.rstrip('/')}/{page}", args.out))
        return 0
    with tempfile.TemporaryDirectory(prefix="mlflow-ui-") as root:
        port = free_port()
        # not 127.0.0.1 or localhost: there the UI opens its assistant panel over a third of the
        # page on a first visit, which a reviewer on a team server never sees
        server = start_mlflow_server(Path(root), port, backend_store_uri=settings.mlflow_tracking_uri, host=HOST)
        try:
            url = f"http://{HOST}:{port}"
            wait_for(lambda: healthy(url), 240, "the mlflow server", [server], interval=0.5, log=Path(root) / "server.log")
            print(screenshot(f"{url}/{page}", args.out))
        finally:
            stop_server(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())

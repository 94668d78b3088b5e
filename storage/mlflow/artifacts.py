"""Reading a run's artifact files back, for pages that show two runs side by side."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient


def read_run_files(tracking_uri: str, run_id: str, folder: str, names: list[str], dest: Path) -> dict[str, bytes]:
    """The bytes of ``folder/<name>`` for each of ``names`` that the run has, by name.

    Files the run lacks are left out (a run logged before a picture existed, a bucket with no
    individuals), not an error; ``dest`` is the scratch folder the files are downloaded into.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    present = {Path(f.path).name for f in client.list_artifacts(run_id, folder) if not f.is_dir}
    out = {}
    for name in names:
        if name in present:
            local = client.download_artifacts(run_id, f"{folder}/{name}", str(dest))
            out[name] = Path(local).read_bytes()
    return out

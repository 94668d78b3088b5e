"""The team's stores against local disk: ingest and index of the same source into a local folder and
into an S3 store on loopback.

    python -m bench.stores [--rounds N]

Writes the demo catalogue (625 photos of 24 products, pogdiff/demo) once, starts moto's S3 server on
loopback with credentials checked (the team stack's test server, tests/team/stack.py; the dev extra
installs it), then per round and store, on a fresh home: ``storage.parquet.ingest`` of the source
into the dataset, ``tasks.index.build_caption_index`` (embedding, graph, LanceDB write) and
``build_image_features`` with configs/demo.yaml's index section. After one uncounted local round
(model loading), rounds alternate local and S3; the figure of a stage is its median over rounds. Prints one JSON document: seconds per stage and store,
``ratio`` = S3 total / local total, compared with the limit 1.5, and the stage ratios that say where
the time goes. A training checkpoint is not measured: ``runs_dir`` stays on a shared volume (local
disk), so a checkpoint costs the same on both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 1.5  # issue 34: say where the time goes if S3 is slower than this


def _s3_store(root: Path):
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "team")]  # the team stack's S3 server helpers
    import localserver
    import stack

    proc, port = stack.start_s3(root / "s3.log")
    localserver.wait_for(lambda: stack._port_open(port), 60, "moto's S3 server", [proc], log=root / "s3.log")
    return stack.bootstrap_s3(proc, port)


def _round(source: Path, home: Path, dataset: str, lancedb: str, config) -> tuple[dict[str, float], int, int]:
    """Seconds per stage, the dataset's rows and the captions indexed: the same work on every store."""
    from storage.parquet import ingest
    from storage.settings import load_settings
    from tasks.index import build_caption_index, build_image_features

    settings = load_settings(home=home, dataset_uri=dataset, lancedb_uri=lancedb)
    seconds = {}
    started = time.perf_counter()
    report = ingest(source, settings.dataset_uri, config.ingest)
    seconds["ingest"] = time.perf_counter() - started
    started = time.perf_counter()
    captions = build_caption_index(settings, config.index).captions
    seconds["caption_index"] = time.perf_counter() - started
    started = time.perf_counter()
    build_image_features(settings, config.index)
    seconds["image_features"] = time.perf_counter() - started
    return seconds, report.total_rows, captions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds per store (default 3)")
    args = p.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from pogdiff.demo.folder import generate_longtail
    from tasks.config import load_config

    config = load_config(ROOT / "configs" / "demo.yaml")
    with tempfile.TemporaryDirectory(prefix="bench-stores-") as tmp:
        root = Path(tmp)
        source = root / "source"
        generate_longtail(source, seed=0)
        store = _s3_store(root)
        os.environ.update({"AWS_ENDPOINT_URL": store.endpoint, "AWS_ACCESS_KEY_ID": store.access_key,
                           "AWS_SECRET_ACCESS_KEY": store.secret_key, "AWS_REGION": "us-east-1",
                           "AWS_ALLOW_HTTP": "true"})  # LanceDB's object store refuses a plain-http endpoint otherwise
        runs: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
        work: set[tuple[str, int, int]] = set()
        try:
            # not counted: the first round loads the text encoder and the base model (for the UNet features)
            _round(source, root / "warm-up", str(root / "warm-up" / "dataset"), str(root / "warm-up" / "lancedb"), config)
            for n in range(args.rounds):
                home = root / f"local-{n}"
                prefix = f"s3://{store.bucket}/round-{n}"
                for where, done in (("local", _round(source, home, str(home / "dataset"), str(home / "lancedb"), config)),
                                    ("s3", _round(source, root / f"s3-{n}", f"{prefix}/dataset", f"{prefix}/lancedb", config))):
                    runs[where].append(done[0])
                    work.add(done[1:])
        finally:
            store.proc.terminate()
            store.proc.wait(timeout=30)
    if len(work) != 1:
        raise SystemExit(f"the stores did different work (rows, captions): {sorted(work)}")
    rows, captions = work.pop()
    stages = list(runs["local"][0])
    median = {where: {s: statistics.median(r[s] for r in rs) for s in stages} for where, rs in runs.items()}
    total = {where: sum(m.values()) for where, m in median.items()}
    print(json.dumps({
        "bench": "stores", "rows": rows, "captions": captions, "rounds": args.rounds,
        "seconds": {where: {s: round(v, 2) for s, v in m.items()} for where, m in median.items()},
        "total_s": {where: round(v, 2) for where, v in total.items()},
        "ratio": round(total["s3"] / total["local"], 3), "limit": LIMIT,
        "stage_ratio": {s: round(median["s3"][s] / median["local"][s], 3) for s in stages},
        "s3_store": "moto_server on loopback (signed requests)",
        "checkpoint": "not measured: runs_dir stays on a shared volume (local disk) on the team stack",
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

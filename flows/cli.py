"""The ``pogdiff`` command line.

Prefect reads its settings at import time, so the environment (``PREFECT_HOME`` under the
settings' home, an API URL if one is configured, no hub downloads) is prepared before anything
imports prefect.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from flows.cli_args import Parser, at_least, command, existing_file, existing_folder, existing_path, output_file, output_folder
from flows.cli_errors import debug_requested, quiet_prefect, quiet_stores, report
from storage.links import redact_uri
from storage.settings import REPO_ROOT, Settings, load_settings
from tasks.config import RetrainConfig, load_config

if TYPE_CHECKING:
    from tasks.results import RetrainResult

DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
# Where the UIs the demo tells you to start will serve (`mlflow ui --port 5000`, `prefect server
# start`, both on 127.0.0.1 by default): the links the demo writes into MLflow and Prefect point there.
DEMO_MLFLOW_UI = "http://127.0.0.1:5000"
DEMO_PREFECT_UI = "http://127.0.0.1:4200"


def _prepare_env(settings: Settings) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("PREFECT_HOME", str(settings.prefect_home))
    # The first start of the ephemeral server runs database migrations (about a minute on 2 cores).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # The local server's telemetry reaches for the internet, which a pipeline host often cannot.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if settings.prefect_api_url:
        os.environ["PREFECT_API_URL"] = settings.prefect_api_url
        # Prefect prints "View at <UI URL>/runs/..." lines derived from the API URL: never with its credentials
        os.environ.setdefault("PREFECT_UI_URL", redact_uri(settings.prefect_api_url, mask=False).removesuffix("/api"))
    Path(settings.prefect_home).mkdir(parents=True, exist_ok=True)


def print_comparison(metrics: dict[str, float], previous: dict[str, float], label: str) -> None:
    """The metric x bucket table (pogdiff.tables.bucket_columns): each cell the new value and its
    delta against ``previous``, whose values follow in a ``↳ label`` row; fits 100 columns."""
    from pogdiff.tables import bucket_columns, columns

    head, rows = bucket_columns(metrics, previous, label)
    width = max([len(r[0]) for r in rows] + [6]) + 2
    print("\n" + "\n".join(columns([head, *rows], [width, *[-17] * (len(head) - 1)])))


def _run_retrain(source: Path, config: RetrainConfig, settings: Settings, prefect_ui: str | None = None) -> RetrainResult:
    """The retrain flow on ``source``; ``prefect_ui``: the Prefect UI address its links use, where none is configured."""
    from storage.sources import check_source

    check_source(source, config.ingest)  # one clear line for a bad source, before any flow starts
    from prefect.settings import PREFECT_UI_URL, temporary_settings

    from flows.retrain import retrain

    quiet_prefect()

    # a setting, not an environment variable: Prefect reads those once, when it is first imported
    with temporary_settings({PREFECT_UI_URL: prefect_ui}) if prefect_ui and not PREFECT_UI_URL.value() else nullcontext():
        return retrain(str(source.absolute()), config)  # the flow reads a relative source under data_root


def _report(result: RetrainResult, settings: Settings, started: float) -> None:
    ing, cap, img, dec = result.ingest.report, result.captions.report, result.images.report, result.decision
    snap = result.snapshot
    print(f"\nretrain finished in {time.time() - started:.0f} s")
    if result.ingest.cached:
        print(f"  ingest:   source unchanged since its last ingest: skipped (cached); {snap.rows} rows, snapshot {snap.snapshot_id}")
    elif ing.accepted == 0:
        print(f"  ingest:   nothing new ({ing.unchanged} rows unchanged, snapshot {snap.snapshot_id})")
    else:
        print(f"  ingest:   {ing.accepted} new rows, {ing.unchanged} unchanged, rejected {ing.rejected or 0}")
    if result.captions.cached and result.images.cached:
        print(f"  index:    dataset snapshot unchanged: skipped (cached); {cap.captions} captions")
    else:
        print(f"  index:    {cap.embedded} captions embedded, {cap.captions - cap.embedded} reused; "
              f"{img.computed} image features computed")
    print(f"  mlflow:   run {result.run_id}, {dec.model_name} version {dec.version}")
    from tasks.describe import gate_sentence
    from tasks.report import champion_label

    print_comparison(result.metrics, dec.champion_metrics, champion_label(dec))
    print(f"\ngate: {gate_sentence(dec).replace('`', '')}")
    home = settings.home
    print("\nOpen the MLflow UI on this data:")
    from storage.mlflow import connection, ui

    connection.use(settings)
    page = ui.run_link(settings.mlflow_ui_url, result.run_id)  # the model-training view of the run, not GenAI's
    print(f"  .venv/bin/mlflow ui --backend-store-uri {redact_uri(settings.mlflow_tracking_uri)} --port 5000"
          + (f"\n  then open {page}" if page else ""))
    print("Open the Prefect UI on this data:")
    print(f"  PREFECT_HOME={home / 'prefect'} .venv/bin/prefect server start"
          + ("" if settings.prefect_api_url else f"   -> {DEMO_PREFECT_UI}"))


def cmd_demo(args, settings: Settings) -> int:
    from pogdiff.demo import folder

    config = load_config(args.config)
    if args.data:  # the user's own copy: used as it is, never generated over
        source = Path(args.data)
    else:
        # one folder per caption mode, so switching modes never reuses the other mode's captions
        source = Path(settings.data_root) / ("demo-catalogue" if args.captions == "per-image" else f"demo-catalogue-{args.captions}")
        if not (source / folder.CAPTIONS_FILE).exists():
            summary = folder.generate_longtail(source, seed=args.seed, captions=args.captions)
            print(f"generated the demo data set: {summary['images']} images of {summary['individuals']} individuals "
                  f"({summary['captions']} distinct captions) and {summary['holdout']} held-out photos in {source}")
    print(f"source: {source}")
    settings, prefect_ui = demo_ui_urls(settings)
    started = time.time()
    _report(_run_retrain(source, config, settings, prefect_ui), settings, started)
    return 0


def demo_ui_urls(settings: Settings) -> tuple[Settings, str | None]:
    """The demo's settings with the MLflow UI address its printed ``mlflow ui`` command serves, unless
    one is configured (set in the environment too: the flow's tasks load the settings again), and
    the Prefect UI address its links should use: ``prefect server start``'s, unless a Prefect server
    is configured (then Prefect derives it from the API address)."""
    if not settings.mlflow_ui_url:
        os.environ["POGDIFF_MLFLOW_UI_URL"] = DEMO_MLFLOW_UI
        settings = load_settings()
    return settings, None if settings.prefect_api_url else DEMO_PREFECT_UI


def cmd_retrain(args, settings: Settings) -> int:
    started = time.time()
    _report(_run_retrain(Path(args.source), load_config(args.config), settings), settings, started)
    return 0


def cmd_tune(args, settings: Settings) -> int:
    import shutil

    from storage.sources import check_source

    config = load_config(args.config)
    check_source(Path(args.source), config.ingest)
    from flows.tune import tune

    quiet_prefect()

    started = time.time()
    result = tune(str(Path(args.source).absolute()), config)
    chosen = result.chosen
    what = "plain fine-tuning (lam = 0): no borrowing beat it on the validation draw" if chosen.trial < 0 else \
        f"trial {chosen.trial}: {chosen.knobs}"
    print(f"\ntuned in {time.time() - started:.0f} s: {result.trials} trials"
          f"{' (stopped by tune.time_limit_minutes)' if result.out_of_time else ''}; chosen {what}")
    print(f"score {chosen.score:.3f} against {result.reference_score:.3f} for lam = 0; MLflow parent run {result.parent_run_id}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.tuned_config, args.out)
    print(f"retrain config: {args.out or result.tuned_config}  (pogdiff retrain SOURCE --config {args.out or result.tuned_config})")
    return 0


def cmd_evaluate(args, settings: Settings) -> int:
    from storage.mlflow import connection
    from storage.mlflow.references import resolve_run

    started = time.time()
    config = load_config(args.config or DEMO_CONFIG)
    connection.connect(settings)  # a server that does not answer: one line, within the settings' timeout
    resolve_run(settings.mlflow_tracking_uri, args.model, config.registry.model_name)  # a bad reference: one line, no flow run
    from flows.evaluate import evaluate_registered

    quiet_prefect()
    result = evaluate_registered(args.model, config)
    print(f"\nevaluated {result.model} version {result.version} in {time.time() - started:.0f} s "
          f"(MLflow run {result.run_id})")
    print_comparison(result.metrics, result.at_training, "at training")
    return 0


def cmd_demo_data(args, settings: Settings) -> int:
    from pogdiff.demo import folder

    summary = folder.generate_longtail(Path(args.out), seed=args.seed, captions=args.captions, holdout=args.holdout,
                                       catalogue=args.catalogue)
    print(f"wrote {summary['images']} images of {summary['individuals']} individuals "
          f"({summary['captions']} distinct captions) and {summary['holdout']} held-out photos to {args.out}")
    return 0


def cmd_base_build(args, settings: Settings) -> int:
    import shutil

    from pogdiff.base import BaseRecipe, build_base
    from pogdiff.pipelines.pixel import BUILTIN_MODELS

    recipe = BaseRecipe(steps=args.steps) if args.steps else BaseRecipe()
    work = Path(settings.runs_dir) / "base-build"
    started = time.time()

    def progress(step: int, m: dict[str, float]) -> None:
        if step % 100 == 0 or step == recipe.steps:
            print(f"step {step}/{recipe.steps} loss {m['loss']:.4f} ({time.time() - started:.0f} s)", flush=True)

    result = build_base(work, recipe, on_step=progress)
    out = Path(args.out) if args.out else BUILTIN_MODELS["builtin:logos16"]
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(result.model_dir, out)
    print(f"base model written to {out}")
    return 0


def demo_caption_modes() -> tuple[str, ...]:
    from pogdiff.demo.catalogue import CAPTION_MODES

    return CAPTION_MODES


def demo_catalogues() -> tuple[str, ...]:
    from pogdiff.demo.catalogue import CATALOGUES

    return CATALOGUES


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pogdiff-pipeline")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


CONFIG_BUILTIN = "retrain config YAML (default: the built-in defaults, which register the model as pogdiff-demo)"
CONFIG_DEMO = "retrain config YAML (default: configs/demo.yaml)"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pogdiff", description="PoGDiff fine-tuning pipeline: ingest captioned images, index their captions, "
               "fine-tune, evaluate per frequency bucket, register and promote in MLflow.",
               epilog="`pogdiff COMMAND --help` shows a command's options and an example.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("--debug", action="store_true", help="print the traceback of a failure (also POGDIFF_DEBUG=1)")
    p.add_argument("--verbose", action="store_true", help="let third-party INFO logs (MLflow, HTTP clients) through")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = command(sub, "demo", "generate the demo long-tailed data (if missing) and run the retrain flow on it", "pogdiff demo")
    d.add_argument("--config", type=existing_file, default=str(DEMO_CONFIG), help=CONFIG_DEMO)
    d.add_argument("--data", type=existing_folder,
                   help="use this demo data folder as it is (default: <data_root>/demo-catalogue[-individual], generated if missing)")
    d.add_argument("--seed", type=at_least(0), default=0, help="seed of the demo data generator (default: 0)")
    d.add_argument("--captions", choices=demo_caption_modes(), default="per-image",
                   help="per-image: each caption describes its image; individual: one caption per individual")
    d.set_defaults(func=cmd_demo)

    r = command(sub, "retrain", "run the retrain flow on a source: ingest, index, fine-tune, evaluate, register",
                "pogdiff retrain ./catalogue --config configs/demo.yaml")
    r.add_argument("source", type=existing_path, help="a folder with a captions file, a .parquet file or folder of them, a .tar shard or folder of them")
    r.add_argument("--config", type=existing_file, help=CONFIG_BUILTIN)
    r.set_defaults(func=cmd_retrain)

    t = command(sub, "tune", "calibrate PoGDiff's psi and the sampling on a source: short fine-tunes scored on a validation draw",
                "pogdiff tune ./catalogue --config configs/demo.yaml --out configs/tuned.yaml")
    t.add_argument("source", type=existing_path, help="the source to tune on (as for retrain)")
    t.add_argument("--config", type=existing_file, help="retrain config YAML whose knobs to tune; its tune section sets the budget "
                   "(default: the built-in defaults)")
    t.add_argument("--out", type=output_file, help="also write the chosen retrain config to this file")
    t.set_defaults(func=cmd_tune)

    e = command(sub, "evaluate", "evaluate a registered version (default: the champion) on the current data", "pogdiff evaluate challenger")
    e.add_argument("model", nargs="?", default="champion", help="champion, challenger, a version number, NAME@alias or NAME/version")
    e.add_argument("--config", type=existing_file, help="retrain config YAML: its registry and evaluate sections (default: configs/demo.yaml)")
    e.set_defaults(func=cmd_evaluate)

    g = command(sub, "demo-data", "write the demo long-tailed data set to a folder", "pogdiff demo-data ./families --catalogue families")
    g.add_argument("out", type=output_folder, help="folder to write the images and captions.csv into (created if missing)")
    g.add_argument("--seed", type=at_least(0), default=0, help="seed of the generator (default: 0)")
    g.add_argument("--captions", choices=demo_caption_modes(), default="per-image",
                   help="per-image: each caption names the individual and describes its image; individual: one caption per individual")
    g.add_argument("--catalogue", choices=demo_catalogues(), default="zipf",
                   help="zipf: 24 products, 200 down to 3 photos; families: rare variants of best sellers, named after them, beside rare controls")
    g.add_argument("--holdout", type=at_least(0), default=4, help="held-out photos per product (split column 'holdout'; never trained on)")
    g.set_defaults(func=cmd_demo_data)

    b = command(sub, "base", "the embedded base model", "pogdiff base build --steps 100 --out /tmp/base")
    bsub = b.add_subparsers(dest="base_command", required=True, metavar="ACTION", help="build: pretrain it anew")
    bb = command(bsub, "build", "pretrain the base model with the fixed recipe (pogdiff/base.py)", "pogdiff base build")
    bb.add_argument("--out", type=output_folder, help="where to write the model (default: the packaged builtin:logos16)")
    bb.add_argument("--steps", type=at_least(1), help="override the recipe's steps (for a quick look)")
    bb.set_defaults(func=cmd_base_build)
    from flows import cli_compare, cli_index, cli_ingest, cli_models, cli_serve

    for module in (cli_ingest, cli_index, cli_compare, cli_models, cli_serve):
        module.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    args.started = started  # a command's "done in" counts its imports and set-up too
    debug = debug_requested(args.debug)
    if debug:
        os.environ["POGDIFF_DEBUG"] = "1"  # for the flows' log handlers (quiet_prefect) and subprocesses
    quiet_stores(args.verbose)
    settings = None
    try:
        settings = load_settings()
        _prepare_env(settings)
        return args.func(args, settings)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure ends as one line (report says which kind)
        return report(err, debug, settings.mlflow_tracking_uri if settings else None)


if __name__ == "__main__":
    sys.exit(main())

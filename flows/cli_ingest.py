"""``pogdiff ingest SOURCE``: ingest a source into the Parquet dataset, with a progress bar and a
report table (or the report as JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tasks.config import load_config


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _print_table(report, dataset: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ingest of {report.source_kind} source, batch {report.batch_id}")
    table.add_column("outcome")
    table.add_column("inputs", justify="right")
    table.add_row("accepted", str(report.accepted))
    table.add_row("unchanged", str(report.unchanged))
    for reason, n in report.rejected.items():
        table.add_row(f"rejected: {reason}", str(n))
    table.add_section()
    table.add_row("rows in the dataset", str(report.total_rows))
    table.add_row("snapshot", report.snapshot_id)
    console = Console()
    console.print(table)
    if report.rejected:
        console.print(f"rejected inputs, with their messages: {dataset / 'quarantine'}", highlight=False)


def cmd_ingest(args, settings) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from storage.parquet import ingest

    cfg = load_config(args.config).ingest
    if args.kind:
        cfg = cfg.model_copy(update={"source_kind": args.kind})
    dataset = Path(settings.dataset_uri)
    stderr = Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, disable=not stderr.is_terminal, transient=args.json) as progress:
        bar = progress.add_task("ingest", total=None)

        def on_progress(done: int, total: int | None) -> None:
            progress.update(bar, completed=done, total=total)

        report = ingest(Path(args.source), dataset, cfg, workers=args.workers, on_progress=on_progress)
    if args.json:
        print(json.dumps(report.model_dump()))
    else:
        _print_table(report, dataset)
    return 0


def add_commands(sub) -> None:
    i = sub.add_parser(
        "ingest",
        help="ingest a source (folder + captions file, Parquet files, WebDataset .tar shards) into the dataset",
    )
    i.add_argument("source", help="a folder with a captions file, a .parquet file or folder of them, a .tar shard or folder of them")
    i.add_argument("--config", help="retrain config YAML whose 'ingest' section applies")
    i.add_argument("--kind", choices=["folder", "parquet", "webdataset"], help="source kind (default: detected)")
    i.add_argument("--workers", type=_positive, help="decode/validate workers (default: all cores)")
    i.add_argument("--json", action="store_true", help="print the report as JSON (accepted, rejected, snapshot_id, ...)")
    i.set_defaults(func=cmd_ingest)

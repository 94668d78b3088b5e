"""``pogdiff ingest SOURCE``: ingest a source into the Parquet dataset, with a progress bar and a
report table (or the report as JSON)."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.config import load_config


def _print_table(report, dataset: str | Path) -> None:
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
        console.print("rejected inputs, with their messages: `pogdiff quarantine`", highlight=False)


def cmd_ingest(args, settings) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from storage.parquet import ingest

    cfg = load_config(args.config).ingest
    if args.kind:
        cfg = cfg.model_copy(update={"source_kind": args.kind})
    dataset = settings.dataset_uri
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


def cmd_quarantine(args, settings) -> int:
    from pogdiff.tables import columns
    from storage.dataset import read_quarantine

    table = read_quarantine(settings.dataset_uri)
    rows = table.to_pylist()
    if args.reason:
        rows = [r for r in rows if r["reason"] in args.reason]
    if args.source:
        rows = [r for r in rows if args.source in r["source"]]
    if args.json:
        print(json.dumps([{**r, "recorded_at": r["recorded_at"].isoformat()} for r in rows], indent=2))
        return 0
    if not rows:
        print(f"no rejected inputs{' matching the filters' if args.reason or args.source else ''} in {settings.dataset_uri}")
        return 0
    by_reason: dict[str, int] = {}
    for r in rows:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    print(f"{len(rows)} rejected inputs: " + ", ".join(f"{n} {reason}" for reason, n in sorted(by_reason.items())))
    width = max(len(r["reason"]) for r in rows) + 2
    print("\n".join(columns([("reason", "input: why  (source)"),
                             *((r["reason"], f"{r['message']}  ({r['source']})") for r in rows)], [width, 0])))
    return 0


def add_commands(sub) -> None:
    from flows.cli_args import at_least, command, existing_file, existing_path
    from storage.items import Reason

    i = command(sub, "ingest", "ingest a source (folder + captions file, Parquet files, WebDataset .tar shards) into the dataset",
                "pogdiff ingest ./catalogue")
    i.add_argument("source", type=existing_path,
                   help="a folder with a captions file, a .parquet file or folder of them, a .tar shard or folder of them")
    i.add_argument("--config", type=existing_file, help="retrain config YAML whose 'ingest' section applies (default: the built-in defaults)")
    i.add_argument("--kind", choices=["folder", "parquet", "webdataset"], help="source kind (default: detected)")
    i.add_argument("--workers", type=at_least(1), help="decode/validate workers (default: all cores)")
    i.add_argument("--json", action="store_true", help="print the report as JSON (accepted, rejected, snapshot_id, ...)")
    i.set_defaults(func=cmd_ingest)

    q = command(sub, "quarantine", "list the rejected inputs of every ingest, with their reasons",
                "pogdiff quarantine --reason not_an_image --reason too_small")
    q.add_argument("--reason", action="append", choices=[r.value for r in Reason], metavar="REASON",
                   help=f"only this reason (repeatable): {', '.join(r.value for r in Reason)}")
    q.add_argument("--source", help="only inputs of sources whose name contains this text")
    q.add_argument("--json", action="store_true", help="print the rows as a JSON list (source, key, reason, message, batch_id, recorded_at)")
    q.set_defaults(func=cmd_quarantine)

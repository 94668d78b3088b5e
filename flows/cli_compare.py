"""``pogdiff compare A B [--html OUT]``: two evaluated models side by side, bucket x metric, with deltas;
with ``--html`` also as a page a reviewer can attach to a ticket (tasks/compare.py).

A and B are MLflow run ids or model references (``champion``, ``challenger``, ``name@alias``,
``name/version``), resolved in the store of the settings' tracking URI (storage/mlflow/references.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from storage.config import RegisterConfig
from storage.settings import Settings


def _side(r) -> dict:
    return {"ref": r.ref, "run_id": r.run_id, "model": r.model, "version": r.version}


def _label(r) -> str:
    return f"{r.model} v{r.version} (run {r.run_id})" if r.model else f"run {r.run_id}"


def cmd_compare(args, settings: Settings) -> int:
    from pogdiff.compare_page import comparison_rows, direction
    from pogdiff.tables import MISSING, columns, fmt
    from storage.mlflow.references import resolve_run

    from storage.mlflow import connection

    connection.connect(settings)
    a = resolve_run(settings.mlflow_tracking_uri, args.a, args.model)
    b = resolve_run(settings.mlflow_tracking_uri, args.b, args.model)
    rows = comparison_rows(a.metrics, b.metrics)
    if args.html:
        from pogdiff.atomic import write_text_atomic
        from tasks.compare import comparison_page

        write_text_atomic(args.html, comparison_page(settings, a, b))
        print(f"wrote {args.html}: metrics and sample grids of A and B, self-contained",
              file=sys.stderr if args.json else sys.stdout)  # stdout stays one JSON document
    if args.json:
        print(json.dumps({"a": _side(a), "b": _side(b), "rows": rows}))
        return 0
    print(f"A: {args.a} = {_label(a)}")
    print(f"B: {args.b} = {_label(b)}")
    if not rows:
        print("neither run has evaluation metrics ('<bucket>/<metric>')")
        return 0
    head = ("bucket", "metric", "A", "B", "B - A", "  better")
    cells = [(r["bucket"], r["metric"], fmt(r["a"], ".4f"), fmt(r["b"], ".4f"), fmt(r["delta"], "+.4f"), f"  {r['better'] or MISSING}")
             for r in rows]
    print("\n" + "\n".join(columns([head, *cells], [9, 18, -10, -10, -10, 0])))
    lower = sorted({r["metric"] for r in rows if direction(r["metric"]) == "lower"})
    print(f"\n(lower is better: {', '.join(lower) or MISSING}; every other metric: higher is better)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from flows.cli_args import command, output_file

    c = command(sub, "compare", "compare two evaluated models: bucket x metric table with deltas",
                "pogdiff compare champion challenger --html review.html")
    c.add_argument("a", help="run id, alias (champion, challenger), version number, name@alias or name/version")
    c.add_argument("b", help="the same kinds of reference; deltas are B - A")
    c.add_argument("--model", default=RegisterConfig().model_name,
                   help="registered model a bare alias refers to (default: %(default)s)")
    c.add_argument("--json", action="store_true", help="print the table as JSON")
    c.add_argument("--html", metavar="OUT", type=output_file, help="also write one self-contained HTML page (table with deltas and "
                   "directions, both models' sample grids side by side per bucket) to OUT")
    c.set_defaults(func=cmd_compare)
